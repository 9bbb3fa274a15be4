"""Built-in `shapes-video`: short clips of one coloured shape moving left, right, up or down.

Each clip is 8 frames of 48×48 on white: a circle, square or triangle in red, green, blue or
yellow crossing part of the frame at 2–3 pixels a frame, captioned "a red circle moves to the
left". The start is drawn so that every frame holds the whole shape and the middle frame's
position (both coordinates uniform over the same range) says nothing of the direction: one frame
(or an unordered set of frames, for left vs right and up vs down) cannot tell the captions
apart, only motion can. Six (colour, shape, direction) combinations never appear in the
training split, only in validation and test. Clips are written as real MPEG-4 files (PyAV),
every frame a keyframe (a motion-compensated frame keeps residue behind the moving shape, which
would give the direction away), under `$MMTUNE_CACHE`, once per seed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from mmtune.data.builtin.shapes import cache_dir
from mmtune.data.formats import Record

SIZE, FRAMES, RADIUS = 48, 8, 6
COLOURS = ["red", "green", "blue", "yellow"]
RGB = [(230, 20, 20), (20, 180, 20), (20, 40, 230), (240, 210, 0)]
SHAPES = ["circle", "square", "triangle"]
DIRECTIONS = ["to the left", "to the right", "up", "down"]
STEP = {0: (-1, 0), 1: (1, 0), 2: (0, -1), 3: (0, 1)}  # (dx, dy) per direction
CLASSES = list(DIRECTIONS)  # zero-shot video classification: the direction of motion
TEMPLATES = ["something moves {}.", "a shape moves {}."]
SIZES = {"shapes-video": (1536, 192, 384), "shapes-video-mini": (48, 24, 24)}
VERSION = 3


def held_out(colour: int, shape: int, direction: int) -> bool:
    """The 6 of 48 combinations kept out of training: every colour, shape and direction still
    appears in training, each in other combinations."""
    return (colour + 2 * shape + 3 * direction) % 8 == 0


def caption(colour: int, shape: int, direction: int) -> str:
    return f"a {COLOURS[colour]} {SHAPES[shape]} moves {DIRECTIONS[direction]}"


def draw(x: float, y: float, shape: int, colour: int) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: one shape centred at (x, y) on white."""
    img = np.full((SIZE, SIZE, 3), 255, np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    dx, dy = xx - x, yy - y
    if shape == 0:
        mask = dx**2 + dy**2 <= RADIUS**2
    elif shape == 1:
        mask = (np.abs(dx) <= RADIUS - 1) & (np.abs(dy) <= RADIUS - 1)
    else:  # an upward triangle: apex at the top, base at the bottom
        mask = (dy <= RADIUS) & (dy >= -RADIUS) & (np.abs(dx) <= (dy + RADIUS) / 2)
    img[mask] = RGB[colour]
    return img


def clip(rng: np.random.Generator, colour: int, shape: int, direction: int) -> np.ndarray:
    """(FRAMES, SIZE, SIZE, 3): the shape moving at a random speed from a random start."""
    speed = float(rng.uniform(2.0, 3.0))
    travel = speed * (FRAMES - 1)
    sx, sy = STEP[direction]
    lo, hi = RADIUS + 1, SIZE - RADIUS - 2
    # the middle position is uniform over one square whatever the direction, both coordinates
    # over the same range: where the shape is in one frame says nothing of the axis it moves along
    mid = float(rng.uniform(lo + travel / 2, hi - travel / 2))
    across = float(rng.uniform(lo + travel / 2, hi - travel / 2))
    frames = []
    for t in range(FRAMES):
        along = mid + (t - (FRAMES - 1) / 2) * speed * (sx + sy)
        x, y = (along, across) if sx else (across, along)
        frames.append(draw(x, y, shape, colour))
    return np.stack(frames)


def _combos(rng: np.random.Generator, n: int, train: bool) -> list[tuple[int, int, int]]:
    allowed = [
        (c, s, d)
        for c in range(len(COLOURS))
        for s in range(len(SHAPES))
        for d in range(len(DIRECTIONS))
        if not (train and held_out(c, s, d))
    ]
    return [allowed[int(i)] for i in rng.integers(len(allowed), size=n)]


def _write_split(folder: Path, n: int, seed: int, train: bool) -> None:
    from mmtune.data.video import write_video

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lines = []
    for i, (c, s, d) in enumerate(_combos(rng, n, train)):
        write_video(folder / f"{i:05d}.mp4", clip(rng, c, s, d), intra_only=True)
        lines.append(f"{i:05d}\t{c}\t{s}\t{d}")
    (folder / "index.tsv").write_text("\n".join(lines) + "\n")


def ensure_clips(name: str, seed: int) -> Path:
    """The folder of the clips of every split, written once (atomically) and reused."""
    sizes = SIZES[name]
    root = cache_dir() / f"{name}-v{VERSION}-seed{seed}"
    if (root / "COMPLETE").is_file():
        return root
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for k, (split, n) in enumerate(zip(("train", "val", "test"), sizes, strict=True)):
        _write_split(tmp / split, n, seed * 1000 + k, train=split == "train")
    (tmp / "COMPLETE").write_text("")
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def shapes_video_splits(name: str, seed: int) -> dict[str, list[Record]]:
    """{split: records}: one record per clip (path, caption, label = direction)."""
    root = ensure_clips(name, seed)
    out = {}
    for split in ("train", "val", "test"):
        recs = []
        for line in (root / split / "index.tsv").read_text().splitlines():
            stem, c, s, d = line.split("\t")
            path = str(root / split / f"{stem}.mp4")
            recs.append(
                Record(image=path, captions=[caption(int(c), int(s), int(d))], label=int(d), id=f"{split}/{stem}")
            )
        out[split] = recs
    return out
