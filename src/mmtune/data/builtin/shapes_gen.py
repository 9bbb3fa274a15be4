"""Built-in `shapes-gen`: small `shapes` scenes captioned for text-to-image generation.

The `shapes` renderer (`mmtune.data.builtin.shapes.draw`) at 32×32 on a white background, with
1–2 objects of distinct colours, each a circle or a square in its own quadrant, captioned with
every object's colour, shape and coarse position in reading order: "a red circle at the top left
and a blue square at the bottom right". Deterministic by seed.

`HELD_OUT` lists colour–shape–position combinations that never appear in a training or
validation caption; the test split draws from all combinations. `heldout_prompts()` is the fixed
prompt set the generation metrics are measured on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmtune.data.builtin.shapes import COLORS, SHAPES, draw
from mmtune.data.formats import Record

IMAGE_SIZE = 32
RADIUS = 5  # circles of radius 5 / squares of side 11: 11×11 pixels
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]  # reading order
# centre coordinates inside a quadrant of 16 pixels: an object never crosses the midlines, and
# centres keep one phase of the 4-pixel token grid (an 8×8 code grid can represent scenes exactly)
OFFSETS = (6, 10)
SIZES = {"shapes-gen": (20_000, 500, 1_000), "shapes-gen-mini": (400, 50, 50)}
# (colour, shape, quadrant) never seen in a training caption: each colour, shape and quadrant
# still appears often, and each colour–shape pair in at least three quadrants
HELD_OUT = [
    ("red", "circle", "top left"),
    ("green", "square", "top right"),
    ("blue", "circle", "bottom left"),
    ("orange", "square", "bottom right"),
    ("yellow", "circle", "top right"),
    ("gray", "square", "bottom left"),
    ("red", "square", "bottom right"),
    ("blue", "square", "top left"),
]


@dataclass(frozen=True)
class Obj:
    """One object of a scene: colour, shape and quadrant names."""

    colour: str
    shape: str
    quadrant: str

    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} at the {self.quadrant}"


def caption(objects: list[Obj]) -> str:
    """Objects in reading order, joined by "and"."""
    ordered = sorted(objects, key=lambda o: QUADRANTS.index(o.quadrant))
    return " and ".join(o.phrase() for o in ordered)


def parse_caption(text: str) -> list[Obj]:
    """The objects a caption of this grammar names ([] when it names none)."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    out = []
    for i, w in enumerate(words):
        if w in COLORS and i + 1 < len(words) and words[i + 1] in SHAPES:
            rest = " ".join(words[i + 2 : i + 6])
            quadrant = next((q for q in QUADRANTS if rest.startswith(f"at the {q}")), None)
            if quadrant:
                out.append(Obj(w, words[i + 1], quadrant))
    return out


def render(objects: list[Obj], rng: np.random.Generator | None = None) -> np.ndarray:
    """(32, 32, 3) uint8 scene; positions jittered inside their quadrants by `rng` (centred
    without one)."""
    centres, shapes, colours = [], [], []
    for o in objects:
        q = QUADRANTS.index(o.quadrant)
        if rng is None:
            dx = dy = OFFSETS[len(OFFSETS) // 2]
        else:
            dx, dy = (int(v) for v in rng.choice(OFFSETS, size=2))
        centres.append(((q % 2) * (IMAGE_SIZE // 2) + dx, (q // 2) * (IMAGE_SIZE // 2) + dy))
        shapes.append(SHAPES.index(o.shape))
        colours.append(COLORS.index(o.colour))
    return draw(np.array(centres).reshape(-1, 2), np.array(shapes), IMAGE_SIZE, RADIUS, colours)


def sample_scene(rng: np.random.Generator, allow_held_out: bool) -> list[Obj]:
    """1–2 objects of distinct colours in distinct quadrants."""
    held = set(HELD_OUT)
    while True:
        n = int(rng.integers(1, 3))
        colours = rng.choice(len(COLORS), size=n, replace=False)
        quads = rng.choice(len(QUADRANTS), size=n, replace=False)
        objs = [Obj(COLORS[c], SHAPES[int(rng.integers(2))], QUADRANTS[q]) for c, q in zip(colours, quads, strict=True)]
        if allow_held_out or not any((o.colour, o.shape, o.quadrant) in held for o in objs):
            return objs


def other_shape(shape: str) -> str:
    return SHAPES[1 - SHAPES.index(shape)]


def _companion(colour: str, shape: str, quadrant: str) -> Obj:
    """The second object of a prompt pair: the next colour, the other shape, the diagonally
    opposite quadrant."""
    return Obj(
        COLORS[(COLORS.index(colour) + 1) % len(COLORS)], other_shape(shape), QUADRANTS[3 - QUADRANTS.index(quadrant)]
    )


def twin(objects: list[Obj], rng: np.random.Generator) -> list[Obj] | None:
    """A scene one edit away from `objects`, for a hard negative: with two objects, half the time
    their colours or shapes swapped (the same words in another binding), else one object's shape,
    colour or quadrant changed. Never a HELD_OUT combination; None when no edit qualifies."""
    held = set(HELD_OUT)
    used_c, used_q = {o.colour for o in objects}, {o.quadrant for o in objects}
    swaps, singles = [], []
    if len(objects) == 2:
        a, b = objects
        swaps.append([Obj(b.colour, a.shape, a.quadrant), Obj(a.colour, b.shape, b.quadrant)])
        if a.shape != b.shape:
            swaps.append([Obj(a.colour, b.shape, a.quadrant), Obj(b.colour, a.shape, b.quadrant)])
    for k, o in enumerate(objects):
        changed = [Obj(o.colour, other_shape(o.shape), o.quadrant)]
        changed += [Obj(c, o.shape, o.quadrant) for c in COLORS if c not in used_c]
        changed += [Obj(o.colour, o.shape, q) for q in QUADRANTS if q not in used_q]
        singles += [objects[:k] + [c] + objects[k + 1 :] for c in changed]
    swaps, singles = (
        [e for e in edits if not any((o.colour, o.shape, o.quadrant) in held for o in e)] for edits in (swaps, singles)
    )
    pool = swaps if swaps and (not singles or rng.random() < 0.5) else singles
    return pool[int(rng.integers(len(pool)))] if pool else None


def twin_record(record: Record, rng: np.random.Generator) -> Record | None:
    """`twin` of a shapes-gen record as a record of its own: the edited scene rendered (positions
    jittered by `rng`) with its true caption; None when the caption names no object or no edit
    qualifies."""
    objects = parse_caption(record.captions[0]) if record.captions else []
    other = twin(objects, rng) if objects else None
    if other is None:
        return None
    return Record(image=render(other, rng), captions=[caption(other)], id=f"{record.id}-twin")


def generate(n: int, seed: int, allow_held_out: bool) -> tuple[np.ndarray, list[list[Obj]]]:
    """n scenes: images (n, 32, 32, 3) uint8 and their objects."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, allow_held_out) for _ in range(n)]
    images = np.stack([render(objs, rng) for objs in scenes]) if n else np.zeros((0, 32, 32, 3))
    return images.astype(np.uint8), scenes


def shapes_gen_splits(name: str = "shapes-gen", seed: int = 0) -> dict[str, list[Record]]:
    """{split: records}; train and val never caption a HELD_OUT combination, test may."""
    out = {}
    for k, (split, n) in enumerate(zip(("train", "val", "test"), SIZES[name], strict=True)):
        images, scenes = generate(n, seed * 1000 + 500 + k, allow_held_out=split == "test")
        out[split] = [
            Record(image=img, captions=[caption(objs)], id=f"{split}-{i}")
            for i, (img, objs) in enumerate(zip(images, scenes, strict=True))
        ]
    return out


def seen_prompts() -> list[str]:
    """The held-out prompt set's seen twin, for choosing sampling settings without looking at the
    held-out prompts: each HELD_OUT combination with its shape flipped (a combination training
    captions show), alone and beside the companion of `heldout_prompts` (its shape flipped too
    where that companion is itself held out)."""
    prompts, pairs = [], []
    for c, s, q in HELD_OUT:
        own, other = Obj(c, other_shape(s), q), _companion(c, s, q)
        if (other.colour, other.shape, other.quadrant) in HELD_OUT:
            other = Obj(other.colour, other_shape(other.shape), other.quadrant)
        prompts.append(caption([own]))
        pairs.append(caption([own, other]))
    return prompts + pairs


def heldout_prompts() -> list[str]:
    """The fixed prompt set: every HELD_OUT combination alone, then each beside its `_companion`
    (which may itself be held out)."""
    prompts = [caption([Obj(*h)]) for h in HELD_OUT]
    prompts += [caption([Obj(*h), _companion(*h)]) for h in HELD_OUT]
    return prompts
