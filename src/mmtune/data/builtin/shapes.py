"""Built-in `shapes`: procedural Sort-of-CLEVR scenes with questions and captions.

Written from the specification in Santoro et al. 2017 ("A simple neural network module for
relational reasoning", Supplementary): 75×75 images on a plain white background, 6 objects of
distinct colours (red, green, blue, orange, yellow, gray), each a circle or a square; per scene 10
non-relational and 10 relational questions with answers from a fixed vocabulary, and a caption
naming every object's colour, shape and position. Deterministic by seed; generated on first use
and cached as one `.npz` under `$MMTUNE_CACHE` (default `~/.cache/mmtune`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mmtune.data.vqa_formats import QARecord

IMAGE_SIZE = 75
OBJECT_SIZE = 5  # half-side of a square / radius of a circle, in pixels (the paper's size)
MIN_DISTANCE = 15  # > 2·5·√2 between centres: even two squares corner to corner never touch
COLORS = ["red", "green", "blue", "orange", "yellow", "gray"]
RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 156, 0), (255, 255, 0), (128, 128, 128)]
SHAPES = ["circle", "square"]
QUESTIONS_PER_KIND = 10  # per scene: 10 non-relational and 10 relational questions
# (question type, template); the type is recorded on every question
NONREL = [
    ("nonrel.shape", "what is the shape of the {} object?"),
    ("nonrel.horizontal", "is the {} object on the left or on the right?"),
    ("nonrel.vertical", "is the {} object at the top or at the bottom?"),
]
REL = [
    ("rel.closest", "what is the shape of the object closest to the {} object?"),
    ("rel.furthest", "what is the shape of the object furthest from the {} object?"),
    ("rel.count", "how many objects have the same shape as the {} object?"),
]
ANSWERS = ["circle", "square", "left", "right", "top", "bottom", "1", "2", "3", "4", "5", "6"]
SIZES = {"shapes": (10_000, 1_000, 1_000), "shapes-mini": (600, 100, 100)}
VERSION = 2  # bump when generation changes: the cache file name carries it


def cache_dir() -> Path:
    return Path(os.environ.get("MMTUNE_CACHE", Path.home() / ".cache" / "mmtune"))


def _place(rng: np.random.Generator) -> np.ndarray:
    """(6, 2) integer object centres, at least MIN_DISTANCE apart, inside the image."""
    lo, hi = OBJECT_SIZE, IMAGE_SIZE - OBJECT_SIZE
    centres: list[np.ndarray] = []
    while len(centres) < len(COLORS):
        c = rng.integers(lo, hi, size=2)
        if all(((c - o) ** 2).sum() >= MIN_DISTANCE**2 for o in centres):
            centres.append(c)
    return np.stack(centres)


def draw(
    centres: np.ndarray, shapes: np.ndarray, size: int = IMAGE_SIZE, radius: int = OBJECT_SIZE, colours=None
) -> np.ndarray:
    """(size, size, 3) uint8 scene: object k at centres[k] = (x, y), shape shapes[k] (0 circle),
    colour RGB[colours[k]] (default: RGB[k]), half-side / radius `radius`."""
    img = np.full((size, size, 3), 255, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    colours = range(len(centres)) if colours is None else colours
    for (x, y), s, c in zip(centres, shapes, colours, strict=True):
        if s == 0:
            mask = (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
        else:
            mask = (abs(xx - x) <= radius) & (abs(yy - y) <= radius)
        img[mask] = RGB[c]
    return img


def answer(kind: int, colour: int, centres: np.ndarray, shapes: np.ndarray) -> str:
    """The answer to question kind (0-2 non-relational, 3-5 relational) about object `colour`."""
    x, y = centres[colour]
    if kind == 0:
        return SHAPES[shapes[colour]]
    if kind == 1:
        return "left" if x < IMAGE_SIZE / 2 else "right"
    if kind == 2:
        return "top" if y < IMAGE_SIZE / 2 else "bottom"
    dist = ((centres - centres[colour]) ** 2).sum(1).astype(float)
    if kind == 3:
        dist[colour] = np.inf
        return SHAPES[shapes[int(dist.argmin())]]
    if kind == 4:
        return SHAPES[shapes[int(dist.argmax())]]
    return str(int((shapes == shapes[colour]).sum()))  # the object itself counts


def caption(centres: np.ndarray, shapes: np.ndarray) -> str:
    """Every object's colour, shape and position, in the fixed colour order."""
    parts = []
    for k in range(len(COLORS)):
        v = answer(2, k, centres, shapes)
        h = answer(1, k, centres, shapes)
        article = "an" if COLORS[k][0] in "aeiou" else "a"
        parts.append(f"{article} {COLORS[k]} {SHAPES[shapes[k]]} at the {v} {h}")
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def generate(n: int, seed: int) -> dict[str, np.ndarray]:
    """n scenes: images (n,75,75,3) uint8, centres (n,6,2), shapes (n,6), questions (n,20,2)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    centres = np.empty((n, len(COLORS), 2), np.int64)
    shapes = rng.integers(0, 2, size=(n, len(COLORS)))
    for i in range(n):
        centres[i] = _place(rng)
        images[i] = draw(centres[i], shapes[i])
    q = QUESTIONS_PER_KIND
    colour = rng.integers(0, len(COLORS), size=(n, 2 * q))
    kind = np.concatenate([rng.integers(0, 3, (n, q)), rng.integers(3, 6, (n, q))], axis=1)
    questions = np.stack([kind, colour], axis=-1)  # (n, 20, 2): (kind, colour)
    return {"images": images, "centres": centres, "shapes": shapes, "questions": questions}


def load_arrays(name: str = "shapes", seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """{split: arrays} for every split, generated once and cached."""
    sizes = SIZES[name]
    path = cache_dir() / f"shapes-v{VERSION}-seed{seed}-{'-'.join(map(str, sizes))}.npz"
    if not path.is_file():
        parts = {}
        for k, (split, n) in enumerate(zip(("train", "val", "test"), sizes, strict=True)):
            for key, arr in generate(n, seed * 1000 + k).items():
                parts[f"{split}.{key}"] = arr
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez_compressed(tmp, **parts)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    data = np.load(path)
    out: dict[str, dict[str, np.ndarray]] = {"train": {}, "val": {}, "test": {}}
    for key in data.files:
        split, field = key.split(".")
        out[split][field] = data[key]
    return out


def scene_records(arrays: dict[str, np.ndarray], split: str) -> list[QARecord]:
    """One QARecord per question; the 20 questions of a scene share its image array."""
    all_kinds = NONREL + REL
    records = []
    for i, img in enumerate(arrays["images"]):
        centres, shapes = arrays["centres"][i], arrays["shapes"][i]
        cap = caption(centres, shapes)
        for j, (kind, colour) in enumerate(arrays["questions"][i]):
            qtype, template = all_kinds[kind]
            ans = answer(int(kind), int(colour), centres, shapes)
            records.append(
                QARecord(
                    image=img,
                    captions=[cap],
                    id=f"{split}-{i}-{j}",
                    image_id=f"{split}-{i}",
                    question=template.format(COLORS[colour]),
                    answers=[ans],
                    question_type=qtype,
                    answer_type="number" if kind == 5 else "other",
                )
            )
    return records


def shapes_splits(name: str = "shapes", seed: int = 0) -> dict[str, list[QARecord]]:
    arrays = load_arrays(name, seed)
    return {split: scene_records(arrays[split], split) for split in ("train", "val", "test")}
