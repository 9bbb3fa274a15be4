"""Exact distributed contrastive losses: features all-gathered with gradients, local-loss form.

Each of W processes holds b rows of a global batch of N = W·b pairs. It gathers every rank's
embeddings (the gather passes gradients back to their owner) and computes the loss of its own
b rows against all N columns. With gradients averaged over ranks (DDP, or `average_gradients`),
the mean of the W local losses and the resulting gradients equal the single-process loss and
gradients on the whole batch — for CLIP and SigLIP, with or without class-aware targets.

On one process every function here reduces to the plain loss on the local batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mmtune.losses import clip_loss, siglip_loss

__all__ = [
    "average_gradients",
    "clip_loss_rows",
    "distributed_clip_loss",
    "distributed_siglip_loss",
    "gather_no_grad",
    "gather_with_grad",
    "is_distributed",
    "rank_and_world",
    "siglip_loss_rows",
]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather (b, ...) → (W·b, ...); backward sums every rank's gradient of the owner's rows.

    The sum (not the mean) is right: rank r's loss uses rank s's rows as columns, so the
    gradient of the sum of all local losses w.r.t. s's rows collects every rank's part.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over ranks; gloo has no reduce_scatter
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's (b, D) rows in rank order → (W·b, D), differentiable; x itself on one process."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Tensor) -> Tensor:
    """All-gather (b, ...) → (W·b, ...) without gradients (labels, group ids, cached features)."""
    if not is_distributed():
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def _offset_and_groups(rows: int, group_ids: Tensor | None) -> tuple[int, Tensor | None]:
    # where this rank's rows sit in the global batch, and every rank's group ids (N,)
    rank, _ = rank_and_world()
    return rank * rows, None if group_ids is None else gather_no_grad(group_ids)


def distributed_clip_loss(image: Tensor, text: Tensor, scale: Tensor, group_ids: Tensor | None = None) -> Tensor:
    """This rank's share of the global CLIP loss: local image (b, D), text (b, D) → scalar.

    Local rows against all columns, both directions; the mean over ranks is the full-batch loss.
    Every rank must hold the same number of rows.
    """
    if not is_distributed():
        return clip_loss(image, text, scale, group_ids)
    offset, groups = _offset_and_groups(image.shape[0], group_ids)
    all_image, all_text = gather_with_grad(image), gather_with_grad(text)
    image_to_text = clip_loss(image, all_text, scale, groups, row_offset=offset)
    text_to_image = clip_loss(text, all_image, scale, groups, row_offset=offset)
    return (image_to_text + text_to_image) / 2


def distributed_siglip_loss(
    image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, group_ids: Tensor | None = None
) -> Tensor:
    """This rank's share of the global SigLIP loss: local image (b, D) rows against all texts."""
    if not is_distributed():
        return siglip_loss(image, text, scale, bias, group_ids)
    offset, groups = _offset_and_groups(image.shape[0], group_ids)
    return siglip_loss(image, gather_with_grad(text), scale, bias, groups, row_offset=offset)


def clip_loss_rows(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    group_ids: Tensor | None = None,
    rows: slice = slice(None),
    gather: bool = True,
) -> Tensor:
    """The part of this rank's CLIP loss that local rows `rows` contribute: image, text (b, D).

    Summed over a partition of the rows it equals `distributed_clip_loss` (with `gather=False`,
    the loss of this process's own batch); a block of c rows needs (c, N) logits instead of
    (b, N) — how GradCache keeps the loss within memory.
    """
    offset, groups = _offset_and_groups(image.shape[0], group_ids) if gather else (0, group_ids)
    start, stop, _ = rows.indices(image.shape[0])
    share = (stop - start) / image.shape[0]
    all_image = gather_with_grad(image) if gather else image
    all_text = gather_with_grad(text) if gather else text
    if image[rows].shape[0] == all_text.shape[0]:  # one process, all rows: the plain loss
        return clip_loss(image, text, scale, groups)
    image_to_text = clip_loss(image[rows], all_text, scale, groups, row_offset=offset + start)
    text_to_image = clip_loss(text[rows], all_image, scale, groups, row_offset=offset + start)
    return (image_to_text + text_to_image) / 2 * share


def siglip_loss_rows(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    bias: Tensor,
    group_ids: Tensor | None = None,
    rows: slice = slice(None),
    gather: bool = True,
) -> Tensor:
    """The part of this rank's SigLIP loss that local image rows `rows` contribute."""
    offset, groups = _offset_and_groups(image.shape[0], group_ids) if gather else (0, group_ids)
    start, stop, _ = rows.indices(image.shape[0])
    share = (stop - start) / image.shape[0]
    all_text = gather_with_grad(text) if gather else text
    return siglip_loss(image[rows], all_text, scale, bias, groups, row_offset=offset + start) * share


def average_gradients(params) -> None:
    """Average `.grad` over ranks in place (what DDP does), for code paths that bypass DDP."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
