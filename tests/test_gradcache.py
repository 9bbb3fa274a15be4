"""GradCache: gradients equal those of the plain full-batch step (the reference is autograd on
the whole batch), with dropout replayed, uneven chunks, scaled losses and the task wiring."""

from __future__ import annotations

import pytest
import torch

from mmtune.distributed import clip_loss_rows, siglip_loss_rows
from mmtune.gradcache import gradcache_loss
from tests.test_distributed import CASES, batch, reference, tiny_model


def _cached(loss, class_aware, chunk, scale_loss=1.0):
    model = tiny_model()
    b = batch()
    groups = b["labels"] if class_aware else None

    def loss_fn(img, txt, scale, bias, rows):
        if loss == "clip":
            return clip_loss_rows(img, txt, scale, groups, rows)
        return siglip_loss_rows(img, txt, scale, bias, groups, rows)

    torch.manual_seed(123)  # the same dropout stream as the reference
    value = gradcache_loss(model, b, chunk, loss_fn)
    (value * scale_loss).backward()
    return value.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss,class_aware", CASES)
@pytest.mark.parametrize("chunk", [1, 3])
def test_gradients_equal_the_full_batch(loss, class_aware, chunk):
    ref_loss, ref_grads = reference(loss, class_aware)
    value, grads = _cached(loss, class_aware, chunk)
    torch.testing.assert_close(value, ref_loss, atol=1e-10, rtol=0)
    for name, g in ref_grads.items():
        if g is None:  # the bias under the CLIP loss stays without a gradient, as in autograd
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], g, atol=1e-10, rtol=0, msg=name)


def test_dropout_masks_are_replayed():
    """Guard: with dropout on, a different random stream would give other gradients."""
    _, ref_grads = reference("clip", False)
    model = tiny_model()
    b = batch()
    torch.manual_seed(999)
    gradcache_loss(model, b, 3, lambda i, t, s, _, rows: clip_loss_rows(i, t, s, None, rows)).backward()
    assert not torch.allclose(model.vision[1].weight.grad, ref_grads["vision.1.weight"])


def test_backward_scale_reaches_the_gradients():
    _, full = _cached("siglip", True, 3)
    _, half = _cached("siglip", True, 3, scale_loss=0.5)
    for name, g in full.items():
        torch.testing.assert_close(half[name], g * 0.5, msg=name)


def test_task_switch_gives_the_plain_gradients(tiny_cfg):
    """`train.gradcache_chunk` in the contrastive task: tiny-clip (fp32) gradients unchanged."""
    from mmtune.api import build_data, set_seed
    from mmtune.tasks import Context, get_task

    grads = []
    for chunk in (None, 8):
        cfg = tiny_cfg(**{"options.gradcache_chunk": chunk, "options.class_aware": True})
        set_seed(0)
        task = get_task("contrastive")(Context(cfg, build_data(cfg)))
        model = task.build()
        ds = task.dataset(task.ctx.splits.train[:32], train=True)
        b = task.collate([ds[i] for i in range(32)])
        task.loss(model, b)["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)
