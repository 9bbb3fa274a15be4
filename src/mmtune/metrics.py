"""Evaluation metrics: zero-shot classifier weights, classification and retrieval scores.

Every float returned is a plain Python float so results serialise to JSON/YAML unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "classification_metrics",
    "confusion_matrix",
    "retrieval_metrics",
    "zeroshot_weights",
]

ArrayLike = Tensor | np.ndarray | Sequence


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """A tensor (any device, half precision included) or array-like as a numpy array."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16, and float16 comparisons are no more exact than float32 ones
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _labels_array(labels: ArrayLike, n: int, n_classes: int, name: str) -> np.ndarray:
    """Integer labels (n,) checked to lie in [0, n_classes)."""
    array = _to_numpy(labels)
    if array.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got {array.dtype}")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= n_classes):
        raise ValueError(f"{name} must lie in [0, {n_classes}), got {array.min()}..{array.max()}")
    return array


def zeroshot_weights(text_emb: Tensor, n_classes: int, n_templates: int) -> Tensor:
    """Zero-shot classifier from prompt embeddings (C*T, D), class-major -> (C, D) normalised."""
    if text_emb.ndim != 2 or text_emb.shape[0] != n_classes * n_templates:
        raise ValueError(
            f"text_emb must have shape ({n_classes * n_templates}, D) for {n_classes} classes x "
            f"{n_templates} templates, got {tuple(text_emb.shape)}"
        )
    per_template = F.normalize(text_emb.reshape(n_classes, n_templates, -1), dim=-1)
    return F.normalize(per_template.mean(dim=1), dim=-1)


def classification_metrics(logits: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies and mean per-class recall from logits (N, C) and labels (N,).

    Keys ``top{k}`` for each k (k clipped to C) and ``mean_per_class_recall`` (over the classes
    present in ``labels``, using top-1 predictions). Ties rank the lower class index first,
    as a stable argsort of the negated scores would (and as ``argmax`` does for top-1).
    """
    scores = _to_numpy(logits)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"logits must have shape (N, C) with N > 0, got {scores.shape}")
    n, n_classes = scores.shape
    y = _labels_array(labels, n, n_classes, "labels")
    true_scores = scores[np.arange(n), y][:, None]
    # the rank a stable sort would give, without materialising an (N, C) index array
    lower_index = np.arange(n_classes)[None, :] < y[:, None]
    ranks = (scores > true_scores).sum(axis=1) + ((scores == true_scores) & lower_index).sum(axis=1)
    out = {f"top{k}": float(np.mean(ranks < min(k, n_classes))) for k in ks}
    preds = scores.argmax(axis=1)
    recalls = [np.mean(preds[y == cls] == cls) for cls in np.unique(y)]
    out["mean_per_class_recall"] = float(np.mean(recalls))
    return out


def average_precision_per_class(scores: ArrayLike, targets: ArrayLike) -> np.ndarray:
    """Average precision (C,) of each class from scores (N, C) and multi-hot targets (N, C): the
    mean, over the class's positives, of the precision among samples scoring at least as high
    (ties count together, as scikit-learn's ``average_precision_score`` does); 0 for a class
    without positives."""
    s, t = _to_numpy(scores).astype(np.float64), _to_numpy(targets) > 0
    if s.shape != t.shape or s.ndim != 2:
        raise ValueError(f"scores and targets must both be (N, C), got {s.shape} and {t.shape}")
    ap = np.zeros(s.shape[1])
    for k in range(s.shape[1]):
        pos = t[:, k]
        if not pos.any():
            continue
        col = s[:, k]
        at_least = col[None, :] >= col[pos][:, None]  # (positives, N): scored at least as high
        precision = (at_least & pos[None, :]).sum(1) / at_least.sum(1)
        ap[k] = precision.mean()
    return ap


def multilabel_metrics(scores: ArrayLike, labels: Sequence[Sequence[int]]) -> dict[str, float]:
    """``mean_average_precision`` (CLIP_benchmark's multi-label figure: the mean over all classes)
    from scores (N, C) and each sample's classes."""
    s = _to_numpy(scores)
    hot = np.zeros(s.shape, dtype=bool)
    for i, classes in enumerate(labels):
        hot[i, list(classes)] = True
    return {"mean_average_precision": float(average_precision_per_class(s, hot).mean())}


def confusion_matrix(preds: ArrayLike, labels: ArrayLike, n_classes: int) -> np.ndarray:
    """Counts (C, C) int64 of (true label, prediction) pairs from preds (N,) and labels (N,)."""
    y = _to_numpy(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {y.shape}")
    y = _labels_array(y, y.shape[0], n_classes, "labels")
    p = _labels_array(preds, y.shape[0], n_classes, "preds")
    counts = np.bincount(y * n_classes + p, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def ratio(a, b) -> float | None:
    """a / b rounded to 4 places; None when b is 0."""
    return round(float(a) / float(b), 4) if b else None


def per_class_rows(classes: list[str], cm: np.ndarray) -> list[list]:
    """Per class of a confusion matrix (C, C): [name, support, precision, recall], in class order."""
    rows = []
    for c, name in enumerate(classes):
        support, predicted = int(cm[c].sum()), int(cm[:, c].sum())
        rows.append([name, support, ratio(cm[c, c], predicted), ratio(cm[c, c], support)])
    return rows


def class_tables(classes: list[str], preds: ArrayLike, labels: ArrayLike, prefix: str, title: str) -> dict:
    """`{prefix}_per_class` and `{prefix}_confusion` tables ({title, columns, rows}), rows and
    columns in class order (rows: true class, columns: prediction)."""
    cm = confusion_matrix(preds, labels, len(classes))
    per_class = {
        "title": f"{title}: per class",
        "columns": ["class", "support", "precision", "recall"],
        "rows": per_class_rows(classes, cm),
    }
    confusion = {
        "title": f"{title}: confusion matrix (rows: true class, columns: prediction)",
        "columns": ["true \\ predicted", *classes],
        "rows": [[name, *map(int, cm[c])] for c, name in enumerate(classes)],
    }
    return {f"{prefix}_per_class": per_class, f"{prefix}_confusion": confusion}


def _negatives_above_best_positive(
    queries: Tensor, keys: Tensor, query_ids: Tensor, key_ids: Tensor, block_size: int
) -> Tensor:
    """Per query (Nq, D) vs keys (Nk, D): count of negatives scoring >= its best positive (Nq,).

    Key j is a positive of query i when ``query_ids[i] == key_ids[j]``. Counting ties against
    the query keeps degenerate (e.g. constant) embeddings from scoring perfect recall.
    """
    counts = []
    for start in range(0, queries.shape[0], block_size):
        sims = queries[start : start + block_size] @ keys.T
        positive = query_ids[start : start + block_size, None] == key_ids[None, :]
        best = sims.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        counts.append(((sims >= best) & ~positive).sum(dim=1))
    return torch.cat(counts)


@torch.no_grad()
def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_image_index: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
    *,
    block_size: int = 1024,
    image_groups: ArrayLike | None = None,
    median_rank: bool = False,
) -> dict[str, float]:
    """Recall@K both ways from image (Ni, D), text (Nt, D) normalised, text_image_index (Nt,).

    With ``image_groups`` (Ni,), ``text_image_index`` holds text group ids instead: a text and an
    image match when their groups are equal (captions shared by many images, e.g. class prompts).

    i2t: an image is a hit at K if any of its texts is among its top-K texts (images with no
    text are left out); t2i: a text is a hit at K if its image is among its top-K images. A
    negative tied with the best positive counts as ranked above it. Similarities are computed
    ``block_size`` queries at a time, so memory is (block_size, N) rather than (Ni, Nt).
    ``median_rank`` adds ``i2t.median_rank`` / ``t2i.median_rank``: the median 1-based rank of the
    best positive.
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"need image (Ni, D) and text (Nt, D), got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    if n_images == 0 or n_texts == 0 or block_size < 1:
        raise ValueError("need at least one image, one text and block_size >= 1")
    if image_groups is None:
        owners = torch.from_numpy(_labels_array(text_image_index, n_texts, n_images, "text_image_index"))
        image_ids = torch.arange(n_images)
    else:
        groups = _to_numpy(image_groups).astype(np.int64)
        image_ids = torch.from_numpy(_labels_array(groups, n_images, int(groups.max()) + 1, "image_groups"))
        owners = torch.from_numpy(_to_numpy(text_image_index).astype(np.int64))
    # at least float32: half-precision similarities would create spurious ties
    dtype = torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    images, texts = image_emb.to(dtype), text_emb.to(dtype)
    owners, image_ids = owners.to(images.device), image_ids.to(images.device)
    has_text = torch.isin(image_ids, owners)
    i2t = _negatives_above_best_positive(images, texts, image_ids, owners, block_size)
    t2i = _negatives_above_best_positive(texts, images, owners, image_ids, block_size)
    ranks = {"i2t": i2t[has_text], "t2i": t2i}
    out = {f"{direction}.R@{k}": float((r < k).double().mean()) for direction, r in ranks.items() for k in ks}
    if median_rank:
        out.update(
            {f"{direction}.median_rank": float(np.median(r.cpu().numpy()) + 1) for direction, r in ranks.items()}
        )
    return out
