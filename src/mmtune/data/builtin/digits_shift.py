"""Built-in `digits-shift`: the digits test split under fixed, seeded corruptions.

Every test digit appears once per corruption — rotation, Gaussian noise, blur and contrast
inversion — so the split holds 4 × 360 images. Severities are drawn from a generator with a
fixed seed: the split is identical on every machine and run. Corruptions are applied on a 4×
upscaled copy and the result is brought back to 8×8, so the shifted digits go through the same
resize as the clean ones.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from mmtune.data.builtin import digits
from mmtune.data.formats import Record

CORRUPTIONS = ("rotate", "noise", "blur", "invert")
SEED = 20240  # fixed: the shift set must not move with the run's seed
UPSCALE = 4

# Severity ranges, drawn uniformly per image (chosen once, before any model was evaluated).
ROTATE_DEGREES = (15.0, 35.0)  # either direction
NOISE_STD = (32.0, 80.0)  # grey levels of 0..255, added at 8×8
BLUR_RADIUS = (1.5, 3.0)  # pixels of the 4× upscaled image


def _up(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img).resize((8 * UPSCALE, 8 * UPSCALE), Image.BICUBIC)


def _down(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((8, 8), Image.BOX), dtype=np.uint8)


def corrupt(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One corruption of an (8, 8) uint8 digit → (8, 8) uint8."""
    if kind == "rotate":
        angle = float(rng.uniform(*ROTATE_DEGREES)) * (1 if rng.random() < 0.5 else -1)
        return _down(_up(img).rotate(angle, resample=Image.BILINEAR, fillcolor=0))
    if kind == "noise":
        noisy = img.astype(np.float64) + rng.normal(0.0, rng.uniform(*NOISE_STD), img.shape)
        return np.clip(noisy, 0, 255).round().astype(np.uint8)
    if kind == "blur":
        radius = float(rng.uniform(*BLUR_RADIUS))
        return _down(_up(img).filter(ImageFilter.GaussianBlur(radius)))
    if kind == "invert":
        return (255 - img).astype(np.uint8)
    raise ValueError(f"unknown corruption {kind!r} (one of {CORRUPTIONS})")


def shift_records(split_seed: int = 0) -> list[Record]:
    """The test split of `digits` (same `split_seed`) under each corruption, in a fixed order."""
    images, labels = digits.load_arrays()
    test = digits._stratified_split(labels, split_seed)["test"]
    rng = np.random.default_rng(SEED)
    out = []
    for kind in CORRUPTIONS:
        for i in test:
            name = digits.CLASSES[labels[i]]
            out.append(
                Record(
                    image=corrupt(images[i], kind, rng),
                    captions=[t.format(name) for t in digits.EVAL_TEMPLATES],
                    label=int(labels[i]),
                    id=f"digits-shift/{kind}/{i}",
                )
            )
    return out
