"""Built-in presets: their image tower's resolution, patch, width, depth and stem are config fields
(`model.image_size`…), a run rebuilds them, and the shipped 28-px digits config trains.

Before: every preset saw 16×16 pixels and no config key said so or changed it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmtune.checkpoint import save_checkpoint
from mmtune.cli import main
from mmtune.config import ModelConfig, load_config
from mmtune.data.formats import detect_format
from mmtune.errors import ConfigError
from mmtune.models import build_from_spec, load_model, load_weights, save_spec
from mmtune.models.load import PRESET_VISION
from mmtune.runs import load_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "fields", "size", "tokens"),
    [
        ("lit-minilm", {}, 16, 16 + 1),  # 4×4 patches of 4 px, + [CLS]
        ("lit-minilm", {"image_size": 28, "vision_stem": "conv"}, 28, 49 + 1),  # 2 stride-2 convs: 7×7
        ("lit-minilm", {"image_size": 32, "patch_size": 8, "vision_width": 64, "vision_layers": 1}, 32, 16 + 1),
        ("photo-minilm", {}, 224, 14 * 14 + 1),  # 4 stride-2 convs: 14×14
        ("tiny-clip", {"image_size": 28, "patch_size": 7}, 28, 16 + 1),
    ],
)
def test_preset_shape_fields_build_and_reload(tmp_path, name, fields, size, tokens):
    model, proc = load_model(ModelConfig(name=name, **fields))
    model.eval()
    assert proc.image_size == size  # the processor resizes to the tower's resolution
    px = torch.randn(2, 3, size, size)
    assert model.image_tokens(px).shape[1] == tokens
    if "vision_width" in fields:
        assert model.image_tokens(px).shape[2] == fields["vision_width"]
    save_spec(model, proc, tmp_path / "model")
    save_checkpoint(tmp_path / "ckpt", model)
    again, proc2, _ = build_from_spec(tmp_path / "model")
    load_weights(again, tmp_path / "ckpt" / "model.safetensors")
    again.eval()
    assert proc2.image_size == size
    torch.testing.assert_close(model.encode_image(px), again.encode_image(px), rtol=0, atol=1e-6)


def test_the_defaults_are_the_documented_ones():
    """README's preset table and config.py's field descriptions state these values."""
    assert {n: (s.image_size, s.patch_size, s.width, s.layers, s.heads, s.stem) for n, s in PRESET_VISION.items()} == {
        "lit-minilm": (16, 4, 192, 4, 4, "patch"),
        "tiny-clip": (16, 4, 32, 2, 4, "patch"),
        "photo-minilm": (224, 16, 256, 4, 4, "conv"),
    }
    readme = (ROOT / "README.md").read_text()
    for row in (
        "| `lit-minilm` | 16 | 4 | 192 | 4 | 4 | patch |",
        "| `photo-minilm` | 224 | 16 | 256 | 4 | 4 | conv |",
    ):
        assert row in readme


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"name": "runs/whatever", "image_size": 28}, "model.image_size: shape the image tower of a built-in preset"),
        ({"image_size": 30, "patch_size": 4}, "not a multiple of model.patch_size=4"),
        ({"image_size": 24, "patch_size": 6, "vision_stem": "conv"}, "must be a power of two"),
        ({"vision_width": 100, "vision_heads": 3}, "does not split into model.vision_heads=3"),
        ({"name": "tiny-clip", "vision_stem": "conv"}, "patch stem only"),
        ({"vision_stem": "conv", "vision_pos_init": "sincos2d"}, "sincos2d: needs a patch stem"),
        ({"vision_width": 66, "vision_heads": 3, "vision_pos_init": "sincos2d"}, "divisible by 4"),
        ({"name": "runs/whatever", "vision_pos_init": "sincos2d"}, "model.vision_pos_init: shape the image tower"),
    ],
)
def test_impossible_shapes_are_one_line_errors(fields, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_model(ModelConfig(**fields))


@pytest.mark.parametrize("name", ["tiny-clip", "lit-minilm"])
def test_sincos2d_positions_say_where_each_patch_is(name):
    """`model.vision_pos_init=sincos2d`: the class token's position is zero and each patch's is the
    2-D sine/cosine code of its (row, column), from which rows and columns read back exactly by a
    linear map (least squares); the default draws them as noise of std 0.02, quiet beside the
    patches' content."""
    from mmtune.models.load import sincos_2d

    def table(model):
        emb = model.hf.vision_model.embeddings if name == "tiny-clip" else model.tower("vision").embeddings
        w = emb.position_embedding.weight if name == "tiny-clip" else emb.position_embeddings[0]
        return w.detach()

    fields = {"image_size": 24, "patch_size": 4, "vision_width": 32}  # a 6 × 6 grid
    torch.manual_seed(0)
    codes = table(load_model(ModelConfig(name=name, vision_pos_init="sincos2d", **fields))[0])
    assert torch.equal(codes[0], torch.zeros(32)) and torch.equal(codes[1:], sincos_2d(6, 32))
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    where = torch.stack([rows.flatten(), cols.flatten()], 1)

    def fit_error(x):  # largest error of the best linear map (+ bias) from position code to (row, col)
        x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
        return (x @ torch.linalg.lstsq(x, where.double(), driver="gelsd").solution - where).abs().max().item()

    assert fit_error(codes[1:]) < 1e-6
    plain = table(load_model(ModelConfig(name=name, **fields))[0])
    assert plain[1:].std() < 0.05 and not torch.allclose(plain[1:], sincos_2d(6, 32))


def _digits28_folder(root: Path, per_class: int) -> Path:
    """A 28×28 ImageFolder from the built-in digits (8×8, upsampled), one sub-folder per digit."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for digit in range(10):
        folder = root / str(digit)
        folder.mkdir(parents=True)
        for i in np.flatnonzero(d.target == digit)[:per_class]:
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), "L").resize((28, 28), Image.BICUBIC)
            img.save(folder / f"{i}.png")
    return root


def test_digits28_config_trains_on_an_image_folder(tmp_path):
    """configs/digits28.yaml, on a 28-px ImageFolder found by `data.format: auto` (before: a
    folder of class sub-folders was read as a caption folder: "no training records")."""
    train = _digits28_folder(tmp_path / "train", 6)
    test = _digits28_folder(tmp_path / "test", 2)
    assert detect_format(train) == "imagefolder"
    cfg = load_config(ROOT / "configs" / "digits28.yaml")
    assert (cfg.model.image_size, cfg.model.patch_size, cfg.model.vision_stem) == (56, 8, "conv")
    code = main(
        [
            "train",
            "--config",
            str(ROOT / "configs" / "digits28.yaml"),
            f"data.dataset={train}",
            f"data.test={test}",
            f"output_dir={tmp_path / 'runs'}",
            "data.batch_size=16",
            "train.max_steps=3",
            "train.eval_every=0",
            "train.progress=false",
        ]
    )
    assert code == 0
    run = tmp_path / "runs" / "digits28"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data.test"] == 20 and 0.0 <= metrics["top1"] <= 1.0
    _, proc = load_run(run)  # the classifier, rebuilt at the run's resolution
    assert proc.image_size == 56


def test_photo_preset_trains_at_224_and_reloads(tmp_path):
    """photo-minilm, the real-photo preset: a contrastive step at 224 px on photo-sized files (here
    rendered scenes saved as 320×240 JPEGs), then `mmtune eval` rebuilds it from the run folder."""
    from tests.conftest import write_image

    rows = ["image,caption"]
    for i in range(8):
        colour = ((40 * i) % 256, 255 - 30 * i, (90 * i) % 256)
        write_image(tmp_path / f"p{i}.jpg", size=(320, 240), color=colour)
        rows.append(f"p{i}.jpg,a photo of colour number {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    common = [f"output_dir={tmp_path / 'runs'}", "name=photo", "train.progress=false"]
    code = main(
        [
            "train",
            "model.name=photo-minilm",
            f"data.dataset={tmp_path / 'pairs.csv'}",
            f"data.val={tmp_path / 'pairs.csv'}",
            f"data.test={tmp_path / 'pairs.csv'}",
            "data.batch_size=4",
            "train.max_steps=2",
            "train.warmup_steps=1",
            *common,
        ]
    )
    assert code == 0
    run = tmp_path / "runs" / "photo"
    metrics = json.loads((run / "metrics.json").read_text())
    assert "retrieval.i2t.R@1" in metrics
    model, proc = load_model(ModelConfig(name=str(run)))
    assert proc.image_size == 224
    assert model.image_tokens(torch.zeros(1, 3, 224, 224)).shape[1] == 14 * 14 + 1
    assert main(["eval", "--checkpoint", str(run)]) == 0


def test_rotation_augmentation_is_seeded_bounded_and_filled_with_the_background():
    """data.augment_rotate: the same generator seed gives the same rotated image; the angle stays
    within ±degrees; the uncovered corners take the border's colour (black around a digit)."""
    from mmtune.data.images import ImageTransform

    img = Image.new("RGB", (28, 28), (0, 0, 0))
    img.paste((255, 255, 255), (12, 4, 16, 24))  # a vertical stroke: a "1"
    plain = ImageTransform(28, augment=True)
    turned = ImageTransform(28, augment=True, rotate=30.0)
    a = turned(img, np.random.default_rng(5))
    assert np.array_equal(a, turned(img, np.random.default_rng(5)))  # seeded
    assert not np.array_equal(a, plain(img, np.random.default_rng(5)))  # it does rotate
    black = (0.0 - 0.5) / 0.5
    assert np.allclose(a[:, 0, 0], black) and np.allclose(a[:, -1, -1], black)  # corners: background

    # the stroke's angle from vertical, over many draws, stays within the bound (+ crop jitter)
    def tilt(arr):
        ys, xs = np.nonzero(arr[0] > 0)
        return abs(np.degrees(np.arctan2(np.polyfit(ys, xs, 1)[0], 1)))

    tilts = [tilt(turned(img, np.random.default_rng(s))) for s in range(40)]
    assert max(tilts) < 30 + 6 and max(tilts) > 10
    assert (
        ImageTransform(28, augment=False, rotate=30.0)(img, np.random.default_rng(5)).tobytes()
        == ImageTransform(28)(img).tobytes()
    )  # evaluation never rotates
