"""Built-in `digits`: scikit-learn's 1,797 real handwritten 8×8 digits, a fixed stratified split."""

from __future__ import annotations

import numpy as np

from mmtune.data.formats import Record

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Captions seen in training.
TRAIN_TEMPLATES = [
    "a photo of the number {}.",
    "a picture of the digit {}.",
    "an image of a {}.",
    "the number {}.",
    "a drawing of the digit {}.",
    "a {}.",
    "the digit {}, written by hand.",
    "a small image of the number {}.",
]

# Reserved for evaluation: never used to build a training caption.
EVAL_TEMPLATES = [
    "a handwritten {}.",
    "a scan of the numeral {}.",
    "a low resolution picture of a {}.",
    "this is a {}.",
    "a pixelated {}.",
]

SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train, val, test


def _stratified_split(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = round(len(idx) * SPLIT_FRACTIONS[0])
        n_val = round(len(idx) * SPLIT_FRACTIONS[1])
        parts["train"] += idx[:n_train].tolist()
        parts["val"] += idx[n_train : n_train + n_val].tolist()
        parts["test"] += idx[n_train + n_val :].tolist()
    return {k: np.sort(np.asarray(v)) for k, v in parts.items()}


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 images (N, 8, 8) in 0..255 and labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return images, d.target.astype(np.int64)


def digits_splits(seed: int = 0) -> dict[str, list[Record]]:
    """Train/val/test records; training captions use TRAIN_TEMPLATES, val/test EVAL_TEMPLATES."""
    images, labels = load_arrays()
    out = {}
    for split, idx in _stratified_split(labels, seed).items():
        templates = TRAIN_TEMPLATES if split == "train" else EVAL_TEMPLATES
        out[split] = [
            Record(
                image=images[i],
                captions=[t.format(CLASSES[labels[i]]) for t in templates],
                label=int(labels[i]),
                id=f"digits/{i}",
            )
            for i in idx
        ]
    return out
