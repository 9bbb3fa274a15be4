"""The deterministic checker of `shapes-gen` pictures: finds the objects a picture holds (colour,
shape, quadrant) and checks them against a caption — how text-to-image samples are scored."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from mmtune.data.builtin.shapes import RGB, draw
from mmtune.data.builtin.shapes_gen import IMAGE_SIZE, QUADRANTS, RADIUS, SHAPES, Obj, parse_caption
from mmtune.errors import UserError

PALETTE = {"white": (255, 255, 255)} | {
    c: rgb for c, rgb in zip(("red", "green", "blue", "orange", "yellow", "gray"), RGB, strict=True)
}
MAX_COLOUR_DISTANCE = 90.0  # farther from every palette colour: the pixel counts as no colour
MIN_AREA = 30  # pixels: smaller blobs are noise (an object is 81 or 121 pixels)
MIN_IOU = 0.5  # a blob overlapping neither shape of the renderer this much is not an object


@functools.lru_cache(maxsize=4096)
def _template(shape: int, x: int, y: int, h: int, w: int) -> np.ndarray:
    """(h, w) bool mask of the renderer's shape `shape` centred at (x, y) (read-only, cached:
    every blob of every image is matched against the same few hundred placements)."""
    t = (draw(np.array([[x, y]]), np.array([shape]), max(h, w), RADIUS, [0]) != 255).any(-1)
    t = t[:h, :w]
    t.flags.writeable = False
    return t


def _shape_of(mask: np.ndarray) -> str | None:
    """ "circle" or "square": the renderer's shape (radius / half-side RADIUS) that overlaps the
    blob `mask` best (intersection over union), placed at the blob's centroid ± 1 pixel; None when
    neither reaches MIN_IOU.

    Matching the whole shape, not the fill of the bounding box: at radius 5 a digitised disk is a
    9×9 block with its corners cut plus a 1-pixel tip on each side, so a drawing that smooths the
    tips away (any decoder does) fills its box like a square."""
    ys, xs = np.nonzero(mask)
    cx, cy = round(float(xs.mean())), round(float(ys.mean()))
    h, w = mask.shape
    best = {}
    for k, name in enumerate(SHAPES):
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                t = _template(k, cx + dx, cy + dy, h, w)
                best[name] = max(best.get(name, 0.0), (mask & t).sum() / (mask | t).sum())
    name = max(best, key=best.get)
    return name if best[name] >= MIN_IOU else None


def colour_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) index into PALETTE of each pixel's nearest colour; -1 when none is near."""
    pal = np.array(list(PALETTE.values()), np.float32)
    d = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - pal[None, None], axis=-1)
    lab = d.argmin(-1)
    lab[d.min(-1) > MAX_COLOUR_DISTANCE] = -1
    return lab


def find_objects(image: np.ndarray) -> list[Obj]:
    """Objects of a rendered (or generated) scene: per colour, each connected blob of at least
    MIN_AREA pixels that matches a shape of the renderer (`_shape_of`), its quadrant by its
    centroid."""
    from scipy import ndimage

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"checker: expected an (H, W, 3) image, got shape {image.shape}")
    labels = colour_labels(image)
    h, w = labels.shape
    found = []
    for k, colour in enumerate(PALETTE):
        if colour == "white":
            continue
        blobs, n = ndimage.label(labels == k)
        for b in range(1, n + 1):
            ys, xs = np.nonzero(blobs == b)
            if len(ys) < MIN_AREA:
                continue
            shape = _shape_of(blobs == b)
            if shape is None:
                continue
            q = 2 * int(ys.mean() >= h / 2) + int(xs.mean() >= w / 2)
            found.append(Obj(colour, shape, QUADRANTS[q]))
    return found


def check(image, prompt: str | list[Obj]) -> list[bool]:
    """For each object the prompt requests: is it in the image (colour, shape, quadrant)?"""
    wanted = parse_caption(prompt) if isinstance(prompt, str) else prompt
    if not wanted:
        raise UserError(f"checker: the prompt names no object of shapes-gen: {prompt!r}")
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if img.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        img = np.asarray(Image.fromarray(img).resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST))
    present = set(find_objects(img))
    return [o in present for o in wanted]


# ---------------------------------------------------------------- pictures
