"""`--backend onnx` (and `--quantize int8`) for serve and embed give PyTorch's embeddings.

The reference is the PyTorch model's own `encode_image` / `encode_text`; fp32 ONNX must match
within 1e-4 (max abs difference), int8 within INT8_TOL with the same nearest neighbours.
"""

from __future__ import annotations

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from mmtune.data.images import load_image
from mmtune.errors import UserError
from mmtune.runs import load_run
from mmtune.serve import Backend, create_app
from tests.test_serve import LiveServer, make_images, make_run

TOL = 1e-4
INT8_MIN_COSINE = 0.995  # documented in docs/serving.md (0.9996 measured)
TEXTS = ["a photo of the digit three", "seven", "x", "a handwritten four, slightly tilted"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    run = make_run(root / "run")
    paths = make_images(root / "imgs", 6)
    model, proc = load_run(run)
    with torch.no_grad():
        img = model.encode_image(proc.images([load_image(p) for p in paths])).numpy()
        txt = model.encode_text(**proc.tokenize(TEXTS)).numpy()
    return {"root": root, "run": run, "paths": paths, "img": img, "txt": txt}


def served(backend: Backend, paths) -> tuple[np.ndarray, np.ndarray]:
    """Text and image embeddings through the real server on a loopback port."""
    with LiveServer(create_app(backend)) as s:
        r = httpx.post(s.url + "/v1/embed", json={"texts": TEXTS}, timeout=30)
        assert r.status_code == 200, r.text
        txt = np.array(r.json()["embeddings"])
        img = []
        for p in paths:
            r = httpx.post(s.url + "/v1/embed", files={"image": ("q.png", p.read_bytes())})
            assert r.status_code == 200, r.text
            img.append(r.json()["embeddings"][0])
    return np.array(img), txt


def test_onnx_server_gives_the_pytorch_embeddings(world):
    backend = Backend.from_run(world["run"], backend="onnx")
    assert backend.encoder is not backend.model  # really served by ONNX Runtime
    img, txt = served(backend, world["paths"])
    assert np.abs(img - world["img"]).max() <= TOL
    assert np.abs(txt - world["txt"]).max() <= TOL
    assert backend.scale() == pytest.approx(float(backend.model.scale().detach()))


def test_int8_server_is_close_and_keeps_the_ranking(world):
    img, txt = served(Backend.from_run(world["run"], backend="onnx", quantize="int8"), world["paths"])
    cos = np.concatenate([(img * world["img"]).sum(1), (txt * world["txt"]).sum(1)])
    assert cos.min() >= INT8_MIN_COSINE and cos.min() < 1 - 1e-6  # close, yet really quantised
    want = (world["txt"] @ world["img"].T).argmax(1)
    assert ((txt @ img.T).argmax(1) == want).mean() >= 0.75


def test_embed_cli_onnx_equals_torch(world, tmp_path):
    from mmtune.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = {}
    for backend in ("torch", "onnx"):
        out[backend] = tmp_path / f"{backend}.parquet"
        args = [
            "embed",
            "--checkpoint",
            str(world["run"]),
            "--images",
            str(world["root"] / "imgs"),
            "--texts",
            str(texts),
            "-o",
            str(out[backend]),
            "--no-progress",
            "--backend",
            backend,
        ]
        assert main(args) == 0
    a, b = (pq.read_table(out[k]).to_pydict() for k in ("torch", "onnx"))
    assert a["id"] == b["id"] and len(a["id"]) == len(world["paths"]) + len(TEXTS)
    assert np.abs(np.array(a["vector"]) - np.array(b["vector"])).max() <= TOL


class Svd(nn.Module):
    """A text tower ONNX cannot express (no linalg_svd in opset 17): (B, L) → (B, 4)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)  # (B, L, 16)
        return torch.linalg.svd(h[:, :4, :4])[1]  # (B, 4) singular values


def test_a_model_that_cannot_be_exported_is_one_line_error(world, tmp_path):
    from mmtune.models.dual import DualEncoder
    from mmtune.onnx_encoder import maybe_onnx

    _, proc = load_run(world["run"])
    vision = nn.Sequential(nn.Flatten(), nn.LazyLinear(4))
    text = Svd(len(proc.tokenizer))
    model = DualEncoder(vision, text, 4, 4, 4, vision_pooling="none", text_pooling="none")
    with torch.no_grad():
        model.encode_image(torch.zeros(1, 3, proc.image_size, proc.image_size))
    with pytest.raises(UserError) as e:
        maybe_onnx(model, proc, "onnx")
    msg = str(e.value)
    assert "cannot be exported" in msg and "linalg_svd" in msg and "--backend torch" in msg
    assert "\n" not in msg


def test_quantize_without_onnx_backend_exits_2(world, tmp_path):
    from mmtune.cli import main

    args = [
        "embed",
        "--checkpoint",
        str(world["run"]),
        "--images",
        str(world["root"] / "imgs"),
        "-o",
        str(tmp_path / "e.parquet"),
        "--quantize",
        "int8",
    ]
    assert main(args) == 2
