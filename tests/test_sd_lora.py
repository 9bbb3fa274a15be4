"""Stable Diffusion LoRA on the tiny random `tiny-sd` pipeline: training through the CLI and the
engine, adapters-only saving, reload, generation, pipeline folders and their errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mmtune.cli import main
from mmtune.errors import CheckpointError, ConfigError

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "sd-lora-tiny.yaml")
SMALL = [
    "train.max_steps=3",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "options.eval_samples=8",
    "train.progress=false",
    "train.log_every=1",
]


def _base_tensors(model) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor of the model, named as in the base (peft's base_layer removed)."""
    full = nn.Module.state_dict(model)  # the whole model, not the adapters-only view
    return {k.replace(".base_layer", ""): v.clone() for k, v in full.items() if ".lora_" not in k}


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd")
    assert main(["train", "-c", CONFIG, f"output_dir={out}", "name=run", *SMALL]) == 0
    return out / "run"


def test_cli_run_saves_adapters_only_and_generates(sd_run):
    import mmtune
    from mmtune.models.sd import SDLoRAModel, load_base
    from mmtune.tasks.sd_lora import generate_images

    metrics = json.loads((sd_run / "metrics.json").read_text())
    assert np.isfinite(metrics["sd.denoise_loss"]) and metrics["train.steps"] == 3
    saved = load_file(str(sd_run / "checkpoints" / "last" / "model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in saved.items())  # trained
    spec = json.loads((sd_run / "model" / "mmtune_model.json").read_text())
    assert spec["kind"] == "sd-lora" and spec["base"] == "tiny-sd" and spec["resolution"] == 32

    model, proc = mmtune.load_run(sd_run)
    assert isinstance(model, SDLoRAModel) and proc.image_size == 32
    fresh = _base_tensors(load_base("tiny-sd"))
    reloaded = _base_tensors(model)
    assert reloaded.keys() == fresh.keys()
    assert all(torch.equal(reloaded[k], fresh[k]) for k in fresh)

    prompts = ["the number three.", "a seven."]
    images = generate_images(sd_run, prompts, n=2, seed=0, guidance=3.0, steps=3)
    assert len(images) == 2 and all(len(per) == 2 for per in images)
    assert all(im.size == (32, 32) and im.mode == "RGB" for per in images for im in per)
    again = generate_images(sd_run, prompts[:1], n=2, seed=0, guidance=3.0, steps=3)
    other = generate_images(sd_run, prompts[:1], n=2, seed=1, guidance=3.0, steps=3)
    px = [np.asarray(im) for im in images[0]]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(px, again[0], strict=True))
    assert not np.array_equal(px[0], np.asarray(other[0][0]))
    assert not np.array_equal(px[0], px[1])  # n images of one prompt differ
    with pytest.raises(ConfigError):
        generate_images(sd_run, [], n=1, seed=0, guidance=1.0)


def test_predict_returns_png_images(sd_run):
    import base64
    import io

    from PIL import Image

    from mmtune.errors import DataError
    from mmtune.runs import open_run

    task, model = open_run(sd_run)
    (out,) = task.predict(model, [{"prompt": "a three.", "n": 2, "steps": 2}])
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in out["images"]]
    assert out["prompt"] == "a three." and [im.size for im in images] == [(32, 32)] * 2
    with pytest.raises(DataError, match="prompt"):
        task.predict(model, [{"text": "a three."}])


def test_generate_command_writes_the_grid(sd_run, tmp_path, capsys):
    from PIL import Image

    from mmtune.generation import grid
    from mmtune.tasks.sd_lora import generate_images

    out = tmp_path / "x.png"
    assert main(["generate", "--checkpoint", str(sd_run), "a prompt", "-n", "2", "--out", str(out)]) == 0
    assert "a prompt" in capsys.readouterr().out
    expected = grid(generate_images(sd_run, ["a prompt"], n=2, seed=0, guidance=7.5), scale=2)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))


def test_clip_score_with_an_mmtune_dual_encoder(sd_run, tmp_path):
    from mmtune.checkpoint import save_checkpoint
    from mmtune.config import load_config
    from mmtune.data.builtin.digits import digits_splits
    from mmtune.models import load_model, save_spec
    from mmtune.runs import open_run

    clip_cfg = load_config(None, {"model.name": "tiny-clip"})
    clip, clip_proc = load_model(clip_cfg.model)  # an untrained dual-encoder run
    save_spec(clip, clip_proc, tmp_path / "clip" / "model")
    save_checkpoint(tmp_path / "clip" / "checkpoints" / "last", clip)
    opts = {"clip_checkpoint": str(tmp_path / "clip"), "clip_prompts": 2, "clip_steps": 2}
    cfg = load_config(str(sd_run / "config.yaml"), {f"options.{k}": v for k, v in opts.items()})
    task, model = open_run(sd_run, cfg)
    records = digits_splits()["test"][:4]
    m = task.evaluate(model, records).metrics
    assert 0 <= m["sd.clip_score"] <= 100 and m == task.evaluate(model, records).metrics


def test_training_changes_only_adapters_lowers_loss_and_reloads(tmp_path):
    from mmtune.api import build_data
    from mmtune.config import load_config, parse_overrides
    from mmtune.engine import Trainer, make_accelerator
    from mmtune.tasks import Context
    from mmtune.tasks.sd_lora import SDLoRATask, load_base, load_sd_run

    torch.manual_seed(0)
    overrides = [
        "train.max_steps=10",
        "train.lr=3e-2",
        "train.warmup_steps=0",
        "data.batch_size=4",
        "options.caption_dropout=0",
        "train.progress=false",
    ]
    cfg = load_config(CONFIG, {"output_dir": str(tmp_path), "name": "mem", **parse_overrides(overrides)})
    splits = build_data(cfg)
    batch = splits.train[:4]  # the fixed batch: trained on and scored with fixed noise
    task = SDLoRATask(Context(cfg, splits))
    model = task.build()
    base_before = _base_tensors(model)
    loss_before = task.denoise_loss(model, batch)
    assert task.denoise_loss(model, batch) == loss_before  # fixed seeds and timesteps

    task.save(model, cfg.run_dir / "model")  # what api.train writes before the loop
    Trainer(cfg, task, model, make_accelerator(cfg, cfg.run_dir), (batch, []), cfg.run_dir).fit()
    model.eval()
    base_after = _base_tensors(model)
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    assert task.denoise_loss(model, batch) < 0.97 * loss_before

    reloaded, _ = load_sd_run(cfg.run_dir)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    cond = torch.randn(2, 16, 32, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        out = model(latents, t, cond)
        assert torch.allclose(out, reloaded(latents, t, cond), atol=1e-6)
        assert not torch.allclose(out, load_base("tiny-sd")(latents, t, cond), atol=1e-4)


def _save_tiny_pipeline(folder: Path) -> None:
    from diffusers import DDPMScheduler

    from mmtune.models.sd import _tiny_components

    unet, vae, text, tok, scheduler = _tiny_components()
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    tok.save_pretrained(folder / "tokenizer")
    DDPMScheduler.from_config(scheduler).save_pretrained(folder / "scheduler")


def test_pipeline_folder_trains_on_pairs_and_bad_folders_fail_clearly(tmp_path, pairs_folder, capsys):
    from mmtune.models.sd import check_pipeline_folder, load_base, load_sd_run

    folder = tmp_path / "pipe"
    _save_tiny_pipeline(folder)
    preset = _base_tensors(load_base("tiny-sd"))
    images, rows = pairs_folder  # a pairs CSV as training data, the folder as base
    (images / "pairs.csv").write_text("image,caption\n" + "".join(f"{n},{c}\n" for n, c, _ in rows))
    args = [
        "train",
        "-c",
        CONFIG,
        f"output_dir={tmp_path}",
        "name=f",
        f"model.name={folder}",
        f"data.dataset={images / 'pairs.csv'}",
        "data.val_fraction=0.25",
        "eval.split=val",
        *SMALL,
        "train.max_steps=1",
    ]
    assert main(args) == 0
    run = tmp_path / "f"
    assert json.loads((run / "model" / "mmtune_model.json").read_text())["base"] == str(folder.resolve())
    loaded = _base_tensors(load_sd_run(run)[0])
    assert loaded.keys() == preset.keys()
    assert all(torch.equal(loaded[k], preset[k]) for k in preset)

    with pytest.raises(CheckpointError, match="missing unet/, vae/, text_encoder/"):
        check_pipeline_folder(tmp_path)
    with pytest.raises(CheckpointError, match="not a diffusers pipeline folder"):
        load_base(str(tmp_path / "nowhere"))
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "vae" / "diffusion_pytorch_model.bin")  # a pickle is not accepted
    with pytest.raises(CheckpointError, match=r"missing vae/diffusion_pytorch_model\.safetensors"):
        check_pipeline_folder(folder)
    code = main(["train", "-c", CONFIG, f"output_dir={tmp_path}", f"model.name={folder}", *SMALL])
    assert code == 2 and "missing vae/diffusion_pytorch_model.safetensors" in capsys.readouterr().err
    (folder / "vae" / "diffusion_pytorch_model.bin").rename(weights)

    with open(folder / "unet" / "diffusion_pytorch_model.safetensors", "ab") as f:
        f.write(b"\0")  # the base changed under the run
    with pytest.raises(CheckpointError, match="changed since training"):
        load_sd_run(run)

    config = folder / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(CheckpointError, match="ships its own modelling code"):
        check_pipeline_folder(folder)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("options.resolution=20", "multiple of 8"),
        ("options.rnk=2", "options.rnk"),
        ("options.targets=[nothing]", "match no linear layer"),
    ],
)
def test_bad_options_are_config_errors(tmp_path, override, message):
    from mmtune.config import load_config, parse_overrides
    from mmtune.tasks import Context
    from mmtune.tasks.sd_lora import SDLoRATask

    cfg = load_config(CONFIG, {"output_dir": str(tmp_path), **parse_overrides([override])})
    with pytest.raises(ConfigError, match=message):
        SDLoRATask(Context(cfg)).build()
