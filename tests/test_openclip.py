"""open_clip checkpoints ⇄ transformers CLIPModel, checked against open_clip's own forward pass.

The reference is open_clip 3.3.0's model code and tokenizer as they ship (`tests/openclip_ref.py`
loads them without torchvision). Models are random-weight builds of open_clip's shipped configs,
cut to 2 blocks per tower for CPU time (widths, heads, patch, image size and activation kept).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmtune.cli import main
from tests.openclip_ref import (
    load_open_clip_ref,
    open_clip_modules,
    save_open_clip,
    shipped_config,
)

TEXTS = ["a photo of a cat", "Hello, World!! it's 3.14 o'clock", "naïve café 🙂", "x"]
CASES = [("ViT-B-32", {}), ("ViT-B-16-quickgelu", {}), ("ViT-L-14", {}), ("ViT-B-32", {"context_length": 32})]


def _reference(model, cfg, pixels):
    """open_clip's normalised (image (B, E), text (B, E)) for TEXTS with its own tokenizer."""
    _, tok = open_clip_modules()
    ids = tok.SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))(TEXTS)
    with torch.no_grad():
        return F.normalize(model.encode_image(pixels), dim=-1), F.normalize(model.encode_text(ids), dim=-1)


def _unit(features):
    """L2-normalised projected features (transformers 5 returns them as `pooler_output`)."""
    return F.normalize(getattr(features, "pooler_output", features), dim=-1)


def test_offline_tokenizer_equals_open_clips():
    from mmtune.models.clip_bpe import clip_tokenizer

    _, tok = open_clip_modules()
    texts = [*TEXTS, "  spaces\tand\nTABS  ", "UPPER lower MiXeD123", "a " * 100]
    ref = tok.SimpleTokenizer(context_length=77)(texts)
    ours = clip_tokenizer(77)(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"] * ours["attention_mask"], ref)  # open_clip pads with 0


@pytest.mark.parametrize(("name", "text"), CASES, ids=lambda c: str(c))
def test_convert_matches_open_clip_and_round_trips(name, text, tmp_path, capsys):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    from mmtune.models.load import Processor
    from mmtune.models.openclip import write_open_clip

    cfg = shipped_config(name, **text)
    pre = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    ref = save_open_clip(cfg, tmp_path / "oc", preprocess=pre)
    assert main(["convert", "open-clip", str(tmp_path / "oc"), "-o", str(tmp_path / "hf")]) == 0
    assert "CLIPModel" in capsys.readouterr().out
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()  # plain transformers, no mmtune
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ip = CLIPImageProcessor.from_pretrained(tmp_path / "hf")
    size = cfg["vision_cfg"]["image_size"]
    assert ip.crop_size == {"height": size, "width": size}
    assert list(ip.image_mean) == pre["mean"] and list(ip.image_std) == pre["std"]
    ctx = cfg["text_cfg"].get("context_length", 77)
    assert tok.model_max_length == ctx == hf.config.text_config.max_position_embeddings
    px = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    want = _reference(ref, cfg, px)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = (_unit(hf.get_image_features(pixel_values=px)), _unit(hf.get_text_features(**enc)))
    for a, b in zip(want, got, strict=True):
        assert (a - b).abs().max() <= 1e-4
    assert hf.logit_scale.item() == pytest.approx(ref.logit_scale.item(), abs=1e-6)
    # back to open_clip: open_clip loads it strictly, and computes what the original did
    (tmp_path / "back").mkdir()
    proc = Processor(tok, size, tuple(ip.image_mean), tuple(ip.image_std), ctx)
    write_open_clip(hf, proc, tmp_path / "back")
    again = load_open_clip_ref(tmp_path / "back")
    for a, b in zip(want, _reference(again, cfg, px), strict=True):
        assert (a - b).abs().max() <= 1e-4
    back_cfg = json.loads((tmp_path / "back" / "open_clip_config.json").read_text())
    assert back_cfg["preprocess_cfg"]["mean"] == pre["mean"]
    assert bool(back_cfg["model_cfg"].get("quick_gelu")) == bool(cfg.get("quick_gelu"))


@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("ViT-B-16-SigLIP", "timm image tower"),
        ("xlm-roberta-base-ViT-B-32", "Hugging Face text"),
        ("RN50", "ResNet image tower"),
        ("ViT-M-16-alt", "ls_init_value"),
        ("coca_ViT-B-32", "CoCa"),
    ],
)
def test_unsupported_towers_are_refused_naming_them(name, found, tmp_path, capsys):
    cfg = shipped_config(name, max_layers=None)
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    assert main(["convert", "open-clip", str(tmp_path / "oc"), "-o", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert found in err and len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_pickled_open_clip_weights_are_refused_without_running_them(tmp_path, capsys):
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(shipped_config("ViT-B-32")))
    (folder / "open_clip_pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    assert main(["convert", "open-clip", str(folder), "-o", str(tmp_path / "hf")]) == 2
    assert "open_clip_pytorch_model.bin: pickled" in capsys.readouterr().err
    assert not marker.exists()


def test_open_clip_model_fine_tunes_evaluates_and_exports_back(tmp_path):
    """model.name = an open_clip folder → train through the CLI → export --format open-clip."""
    cfg = shipped_config("ViT-B-32", max_layers=1, width=32, heads=4, context_length=24)
    cfg["vision_cfg"].update(width=64, head_width=32, image_size=32, patch_size=8)
    cfg["embed_dim"] = 32
    save_open_clip(cfg, tmp_path / "oc")
    args = [
        "train",
        f"model.name={tmp_path / 'oc'}",
        f"output_dir={tmp_path}",
        "name=run",
        "data.batch_size=16",
        "train.max_steps=3",
        "train.progress=false",
    ]
    assert main(args) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["zeroshot.top1"] <= 1.0
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["zeroshot.top1"] == pytest.approx(metrics["zeroshot.top1"])
    assert main(["export", str(run), "--format", "open-clip", "-o", str(tmp_path / "x")]) == 0
    from mmtune.runs import load_run

    model, proc = load_run(run)
    ref = load_open_clip_ref(tmp_path / "x")  # open_clip's own model from the exported folder
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = (model.encode_image(px), model.encode_text(**proc.tokenize(TEXTS)))
    for a, b in zip(want, _reference(ref, cfg, px), strict=True):
        assert (a - b).abs().max() <= 1e-4
    assert "local-dir:" in (tmp_path / "x" / "README.md").read_text()


def test_export_refuses_a_model_whose_tokenizer_open_clip_would_not_use(tmp_path, capsys):
    """tiny-clip is a CLIPModel with a BERT word-piece vocabulary: open_clip would tokenize its
    prompts with CLIP's BPE and get other ids, so the export says so instead of writing it."""
    args = [
        "train",
        "model.name=tiny-clip",
        f"output_dir={tmp_path}",
        "name=run",
        "train.max_steps=1",
        "train.progress=false",
    ]
    assert main(args) == 0
    capsys.readouterr()
    out = tmp_path / "x"
    assert main(["export", str(tmp_path / "run"), "--format", "open-clip", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "CLIP's BPE" in err and "BertTokenizer" in err and len(err.splitlines()) == 1
    assert not (out / "open_clip_model.safetensors").exists()


def test_weights_contradicting_the_config_are_one_line(tmp_path, capsys):
    cfg = shipped_config("ViT-B-32", max_layers=1, width=32, heads=4, context_length=24)
    cfg["vision_cfg"].update(width=64, head_width=32, image_size=32, patch_size=8)
    save_open_clip(cfg, tmp_path / "oc")
    cfg["text_cfg"]["width"] = 48  # the config now says another width than the weights have
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    assert main(["convert", "open-clip", str(tmp_path / "oc"), "-o", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights do not fit its config" in err and "token_embedding" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "hf").exists()
