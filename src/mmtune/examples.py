"""Prediction examples for the run report: the most confident right and wrong predictions of a
classifier, and a few retrieval queries with their top hits — each row with a thumbnail.

A task returns them in `Evaluation.examples`; the program writes `examples/NAME.json` and the
thumbnails `examples/NAME/NN.png`, and the report shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mmtune.data.images import load_image

THUMBNAIL = 96  # longest side in pixels; smaller images are kept as they are
PER_SET = 8


@dataclass
class Examples:
    """A titled set of examples: one row of values and one thumbnail (PIL) per example."""

    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    images: list = field(default_factory=list)


def thumbnail(source, size: int = THUMBNAIL):
    """A record's image (path or pixels) shrunk to at most size × size, as an RGB PIL image."""
    img = load_image(source).copy()
    img.thumbnail((size, size))
    return img


def classification_examples(
    probs: torch.Tensor, labels, records: list, classes: list[str], what: str, k: int = PER_SET
) -> dict[str, Examples]:
    """From probabilities (N, C) and true labels (N,): `correct` — the k right predictions with
    the highest probability — and `wrong` — the k wrong ones with the highest probability of the
    (wrong) predicted class; each sorted by that probability, highest first."""
    p = probs.detach().float().cpu().numpy()
    y = np.asarray(labels, dtype=np.int64)
    pred, conf = p.argmax(1), p.max(1)
    p_true = p[np.arange(len(y)), y]
    columns = ["id", "true", "predicted", "probability", "p(true)"]
    out = {}
    for name, hit, title in (
        ("correct", True, f"Most confident correct ({what})"),
        ("wrong", False, f"Most confident wrong ({what})"),
    ):
        idx = np.flatnonzero((pred == y) == hit)
        idx = idx[np.argsort(-conf[idx], kind="stable")][:k]
        ex = Examples(title, columns)
        for i in idx:
            r = records[i]
            ex.rows.append(
                [r.id, classes[y[i]], classes[pred[i]], round(float(conf[i]), 4), round(float(p_true[i]), 4)]
            )
            ex.images.append(thumbnail(r.image))
        out[name] = ex
    return out


def retrieval_examples(scores: torch.Tensor, texts: list[str], relevant: torch.Tensor, records: list, k: int = 3):
    """Text → image search: each text's top-k images by score (texts × images), with whether each
    hit is relevant (`relevant`, the same shape, bool)."""
    ex = Examples("Retrieval: text queries and their top images", ["query", "rank", "id", "score", "relevant"])
    top = scores.float().topk(min(k, scores.shape[1]), dim=1)
    for q in range(len(texts)):
        for rank, (score, i) in enumerate(zip(top.values[q].tolist(), top.indices[q].tolist(), strict=True), 1):
            ex.rows.append([texts[q], rank, records[i].id, round(score, 4), bool(relevant[q, i])])
            ex.images.append(thumbnail(records[i].image))
    return ex
