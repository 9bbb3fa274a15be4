"""Contrastive image-text losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss.

Both take a block of image rows against all text columns so that a distributed version can pass
its local rows against gathered columns (``row_offset``); on a single device the block is the
whole batch and ``row_offset`` stays 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["caption_group_ids", "clip_loss", "contrastive_logits", "siglip_loss"]


def contrastive_logits(image_emb: Tensor, text_emb: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Scaled similarities ``scale * image @ text.T (+ bias)``: (b, D), (N, D) -> (b, N)."""
    logits = scale * (image_emb @ text_emb.T)
    if bias is not None:
        logits = logits + bias
    return logits


def _positive_mask(n_rows: int, n_cols: int, row_offset: int, group_ids: Tensor | None, device: torch.device) -> Tensor:
    """Which (row, column) pairs are positives -> bool (b, N); rows start at ``row_offset``."""
    if row_offset < 0 or row_offset + n_rows > n_cols:
        raise ValueError(f"rows [{row_offset}, {row_offset + n_rows}) do not fit in a batch of {n_cols} columns")
    rows = torch.arange(row_offset, row_offset + n_rows, device=device)
    if group_ids is None:
        return rows[:, None] == torch.arange(n_cols, device=device)[None, :]
    group_ids = torch.as_tensor(group_ids, device=device)
    if group_ids.shape != (n_cols,):
        raise ValueError(f"group_ids must have shape ({n_cols},) (one per column), got {tuple(group_ids.shape)}")
    return group_ids[rows][:, None] == group_ids[None, :]


def _soft_cross_entropy(logits: Tensor, positives: Tensor) -> Tensor:
    """Mean over rows of cross-entropy against a uniform target over each row's positives.

    logits (b, N) float, positives (b, N) bool with at least one True per row -> scalar.
    """
    log_probs = logits.log_softmax(dim=1)
    # masked_fill, not multiply by 0, so a -inf log-probability off the targets cannot give NaN
    positive_log_probs = log_probs.masked_fill(~positives, 0.0).sum(dim=1)
    return -(positive_log_probs / positives.sum(dim=1)).mean()


def clip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    scale: Tensor,
    group_ids: Tensor | None = None,
    *,
    row_offset: int = 0,
) -> Tensor:
    """CLIP InfoNCE, image (b, D) and text (N, D) L2-normalised, group_ids (N,) -> scalar.

    Positives are the diagonal, or every pair with equal ``group_ids`` (class-aware targets);
    each row's target is uniform over its positives. When b == N (the whole batch) the loss is
    the mean of the image->text and text->image directions. When b < N the image rows are rows
    [row_offset, row_offset + b) of the batch and only the image->text direction is returned;
    the caller adds the text->image direction with the symmetric call
    ``clip_loss(text_local, image_all, scale, group_ids, row_offset=row_offset)`` and halves
    the sum.
    """
    logits = contrastive_logits(image_emb, text_emb, scale)
    n_rows, n_cols = logits.shape
    positives = _positive_mask(n_rows, n_cols, row_offset, group_ids, logits.device)
    image_to_text = _soft_cross_entropy(logits, positives)
    if n_rows < n_cols:
        return image_to_text
    return (image_to_text + _soft_cross_entropy(logits.T, positives.T)) / 2


def siglip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    scale: Tensor,
    bias: Tensor,
    group_ids: Tensor | None = None,
    *,
    row_offset: int = 0,
) -> Tensor:
    """SigLIP sigmoid loss, image (b, D) and text (N, D) L2-normalised, group_ids (N,) -> scalar.

    ``-sum_ij log sigmoid(z_ij * logits_ij) / b`` with z = +1 on positives (the diagonal, or
    equal ``group_ids``) and -1 elsewhere. With b < N the image rows are rows
    [row_offset, row_offset + b) of the batch; the whole-batch loss is the mean of the
    per-block losses over equal-sized blocks, and no symmetric call is needed since every
    pair appears in exactly one block.
    """
    logits = contrastive_logits(image_emb, text_emb, scale, bias)
    n_rows, n_cols = logits.shape
    positives = _positive_mask(n_rows, n_cols, row_offset, group_ids, logits.device)
    signs = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / n_rows


def caption_group_ids(captions: Sequence[str]) -> Tensor:
    """Group ids (B,) long: equal for captions equal after strip + lower-case, first-seen order."""
    ids: dict[str, int] = {}
    # setdefault's len(ids) is evaluated before the insert, so new keys get 0, 1, 2, ...
    groups = [ids.setdefault(caption.strip().lower(), len(ids)) for caption in captions]
    return torch.tensor(groups, dtype=torch.long)
