"""Distributed contrastive losses with 2 real CPU processes (gloo) against the single-process
full-batch loss computed by `mmtune.losses` directly (the reference tested in test_losses.py)."""

from __future__ import annotations

import gc
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mmtune.losses import clip_loss, siglip_loss

pytestmark = pytest.mark.distributed

N, WORLD, VOCAB, L = 8, 2, 50, 5
CASES = [("clip", False), ("clip", True), ("siglip", False), ("siglip", True)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(seed: int = 0, bias: bool = True):
    """A DualEncoder of two small towers (float64): linear on pixels, embedding bag on tokens."""
    from mmtune.models.dual import DualEncoder

    torch.manual_seed(seed)
    vision = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 12), nn.Dropout(0.3))
    text = nn.EmbeddingBag(VOCAB, 10, mode="mean")
    model = DualEncoder(vision, text, 12, 10, 6, "none", "none", logit_bias=-2.0 if bias else None)
    return model.double()


def batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(N, 3, 4, 4, generator=g, dtype=torch.float64),
        "input_ids": torch.randint(0, VOCAB, (N, L), generator=g),
        "attention_mask": torch.ones(N, L, dtype=torch.long),
        "labels": torch.tensor([0, 1, 2, 0, 3, 1, 4, 5]),  # positives across the two ranks
    }


def reference(loss: str, class_aware: bool, model=None):
    """Single process, whole batch: (loss, {param name: grad})."""
    model = model or tiny_model()
    b = batch()
    torch.manual_seed(123)  # dropout masks
    out = model(b["pixel_values"], b["input_ids"], b["attention_mask"])
    groups = b["labels"] if class_aware else None
    img, txt, scale = out["image_emb"], out["text_emb"], out["logit_scale"]
    if loss == "clip":
        value = clip_loss(img, txt, scale, groups)
    else:
        value = siglip_loss(img, txt, scale, out["logit_bias"], groups)
    value.backward()
    return value.detach(), {n: p.grad for n, p in model.named_parameters()}


def _rank_loss(loss, model, b, groups, gradcache: int | None):
    from mmtune.distributed import (
        clip_loss_rows,
        distributed_clip_loss,
        distributed_siglip_loss,
        siglip_loss_rows,
    )
    from mmtune.gradcache import gradcache_loss

    def loss_rows(img, txt, scale, bias, rows):
        if loss == "clip":
            return clip_loss_rows(img, txt, scale, groups, rows)
        return siglip_loss_rows(img, txt, scale, bias, groups, rows)

    if gradcache:
        return gradcache_loss(model, b, gradcache, loss_rows)
    out = model(b["pixel_values"], b["input_ids"], b["attention_mask"])
    img, txt, scale, bias = out["image_emb"], out["text_emb"], out["logit_scale"], out["logit_bias"]
    if loss == "clip":
        return distributed_clip_loss(img, txt, scale, groups)
    return distributed_siglip_loss(img, txt, scale, bias, groups)


def _worker(rank: int, port: int, path: str, gradcache: int | None) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
    results = {}
    for loss, class_aware in CASES:
        model = tiny_model(bias=loss == "siglip")  # DDP wants every parameter used
        model.vision[2].p = 0.0  # dropout masks differ by rank; the reference has one stream
        wrapped = model if gradcache else DDP(model)
        b = {k: v[rows] for k, v in batch().items()}
        groups = b["labels"] if class_aware else None
        value = _rank_loss(loss, wrapped, b, groups, gradcache)
        value.backward()
        mean = value.detach().clone()
        dist.all_reduce(mean)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[(loss, class_aware)] = (mean / WORLD, value.detach(), grads)
    if rank == 0:
        torch.save(results, path)
    # the DDP wrappers hold the group: free them before it goes, so no gloo thread outlives
    # what it uses when the process exits
    del wrapped, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _spawn(tmp_path, gradcache=None) -> dict:
    path = str(tmp_path / "dist.pt")
    mp.start_processes(_worker, args=(free_port(), path, gradcache), nprocs=WORLD, start_method="spawn")
    return torch.load(path, weights_only=False)


def _reference_without_dropout(loss, class_aware):
    model = tiny_model(bias=loss == "siglip")
    model.vision[2].p = 0.0
    return reference(loss, class_aware, model)


@pytest.mark.parametrize("gradcache", [None, 2], ids=["plain", "gradcache"])
def test_two_processes_equal_the_full_batch(tmp_path, gradcache):
    results = _spawn(tmp_path, gradcache)
    for (loss, class_aware), (mean, local, grads) in results.items():
        ref_loss, ref_grads = _reference_without_dropout(loss, class_aware)
        torch.testing.assert_close(mean, ref_loss, atol=1e-5, rtol=0)
        assert not torch.allclose(local, ref_loss), "a rank's own share is not the whole loss"
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=0, msg=name)


def test_local_only_loss_differs_from_the_global_one():
    """Guard for the test above: without the gather the two halves give another loss."""
    model = tiny_model()
    model.vision[2].p = 0.0
    b = batch()
    out = model(b["pixel_values"], b["input_ids"], b["attention_mask"])
    img, txt, s = out["image_emb"], out["text_emb"], out["logit_scale"]
    halves = (clip_loss(img[:4], txt[:4], s) + clip_loss(img[4:], txt[4:], s)) / 2
    assert not torch.allclose(halves, clip_loss(img, txt, s), atol=1e-3)


def test_gather_is_identity_on_one_process():
    from mmtune.distributed import distributed_clip_loss, gather_with_grad

    x = F.normalize(torch.randn(4, 3), dim=-1)
    assert gather_with_grad(x) is x
    torch.testing.assert_close(distributed_clip_loss(x, x, torch.tensor(5.0)), clip_loss(x, x, torch.tensor(5.0)))
