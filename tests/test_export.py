"""Exports give the PyTorch model's embeddings: transformers (`AutoModel`) and ONNX Runtime.

References are computed here with plain transformers / onnxruntime calls, not with mmtune's
own loading helpers; the tolerance is the issue's 1e-4 (max abs difference).
"""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel

from mmtune.data.images import load_image
from mmtune.export import export_hf, export_run, plain_copy
from mmtune.runs import load_run
from tests.test_serve import make_images

TOL = 1e-4
TEXTS = ["a photo of the digit zero", "seven", "a handwritten four on white paper, slightly tilted"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real (2-step) `mmtune train` run of tiny-clip, with config.yaml and metrics.json."""
    from mmtune.api import train
    from mmtune.config import load_config
    from tests.conftest import tiny_overrides

    root = tmp_path_factory.mktemp("export")
    cfg = load_config(None, tiny_overrides(root, **{"train.max_steps": 2}))
    train(cfg)
    paths = make_images(root / "imgs", 5)
    return cfg.run_dir, paths


@contextlib.contextmanager
def transformers_log():
    """What transformers logs at INFO and above meanwhile (its logger does not propagate)."""
    from transformers.utils import logging as hf_logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("transformers")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(level)


def feats(out) -> torch.Tensor:
    """transformers 5 returns an output object (pooler_output = projected features); 4 a tensor."""
    return F.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)


def reference(model, proc, paths):
    with torch.no_grad():
        px = proc.images([load_image(p) for p in paths])
        tok = proc.tokenize(TEXTS)
        return px, tok, model.encode_image(px).numpy(), model.encode_text(**tok).numpy()


def test_hf_export_loads_with_automodel_and_gives_the_same_embeddings(trained, tmp_path):
    run, paths = trained
    out = tmp_path / "hf"
    assert export_run(run, out, "hf")["max_abs_diff"] <= TOL
    model, proc = load_run(run)
    px, tok, img, txt = reference(model, proc, paths)
    hf = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        got_i = feats(hf.get_image_features(pixel_values=px)).numpy()
        got_t = feats(hf.get_text_features(**tok)).numpy()
    assert np.abs(got_i - img).max() <= TOL and np.abs(got_t - txt).max() <= TOL
    card = (out / "README.md").read_text()
    assert "tiny-clip" in card and "zeroshot.top1" in card and "max_steps: 2" in card


def onnx_run(folder, px, tok):
    i = ort.InferenceSession(str(folder / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    t = ort.InferenceSession(str(folder / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy().astype(np.int64) for k, v in tok.items()}
    return i.run(None, {"pixel_values": px.numpy()})[0], t.run(None, feeds)[0]


def test_onnx_export_gives_the_same_embeddings(trained, tmp_path):
    from mmtune.cli import main

    run, paths = trained
    out = tmp_path / "onnx"
    assert main(["export", str(run), "--format", "onnx", "-o", str(out)]) == 0
    model, proc = load_run(run)
    for n in (1, 5):  # batch sizes other than the traced one
        px, tok, img, txt = reference(model, proc, paths[:n])
        got_i, got_t = onnx_run(out, px, tok)
        assert np.abs(got_i - img).max() <= TOL and np.abs(got_t - txt).max() <= TOL
    assert "mmtune export (onnx)" in (out / "README.md").read_text()
    assert main(["export", str(run), "--format", "onnx", "-o", str(out)]) == 2  # not empty


def test_composed_model_exports(tmp_path):
    """lit-minilm (ViT [CLS] + BERT mean pooling): two AutoModel folders + projections, and ONNX."""
    from mmtune.checkpoint import save_checkpoint
    from mmtune.models.load import preset, save_spec

    torch.manual_seed(0)
    model, proc, _ = preset("lit-minilm", embed_dim=32)
    model.lock_text(True)
    run = tmp_path / "run"
    save_spec(model, proc, run / "model")
    save_checkpoint(run / "checkpoints" / "last", model)
    paths = make_images(tmp_path / "imgs", 3)
    px, tok, img, txt = reference(model.eval(), proc, paths)
    export_run(run, tmp_path / "hf", "hf")
    with transformers_log() as logged:
        vision = AutoModel.from_pretrained(tmp_path / "hf" / "vision").eval()
        text = AutoModel.from_pretrained(tmp_path / "hf" / "text").eval()
    # The towers have no pooler; AutoModel's classes do: it used to come back "newly initialized"
    # (MISSING) at random. Now every weight is found, and the pooler is all zeros.
    assert logged.getvalue() and "newly initialized" not in logged.getvalue()
    assert "MISSING" not in logged.getvalue()
    assert all(float(p.detach().abs().max()) == 0 for m in (vision, text) for p in m.pooler.parameters())
    assert "pooler" in (tmp_path / "hf" / "README.md").read_text()
    proj = load_file(str(tmp_path / "hf" / "projection.safetensors"))
    with torch.no_grad():
        cls = vision(pixel_values=px).last_hidden_state[:, 0]
        h = text(**tok).last_hidden_state
        m = tok["attention_mask"][..., None].float()
        got_i = F.normalize(cls @ proj["vision_projection.weight"].T, dim=-1).numpy()
        got_t = F.normalize(((h * m).sum(1) / m.sum(1)) @ proj["text_projection.weight"].T, dim=-1).numpy()
    assert np.abs(got_i - img).max() <= TOL and np.abs(got_t - txt).max() <= TOL
    export_run(run, tmp_path / "onnx", "onnx")
    got_i, got_t = onnx_run(tmp_path / "onnx", px, tok)
    assert np.abs(got_i - img).max() <= TOL and np.abs(got_t - txt).max() <= TOL


def test_lora_adapters_are_merged_before_export(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    from mmtune.models.load import preset

    torch.manual_seed(0)
    model, proc, _ = preset("tiny-clip")
    paths = make_images(tmp_path / "imgs", 3)
    before = reference(model.eval(), proc, paths)[3]
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inject_adapter_in_model(cfg, model.hf)
    px, tok, img, txt = reference(model.eval(), proc, paths)
    assert np.abs(before - txt).max() > 1e-3  # the adapters really change the embeddings
    plain, merged = plain_copy(model)
    assert merged == 8  # q and v in 2 layers of each tower
    assert not any("lora" in k for k in plain.state_dict())
    export_hf(plain, proc, tmp_path / "hf")
    hf = AutoModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got_i = feats(hf.get_image_features(pixel_values=px)).numpy()
        got_t = feats(hf.get_text_features(**tok)).numpy()
    assert np.abs(got_i - img).max() <= TOL and np.abs(got_t - txt).max() <= TOL
