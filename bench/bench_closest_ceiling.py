"""How well "closest" / "furthest" on `shapes` can be answered from coarse positions alone.

    python bench/bench_closest_ceiling.py [--split test] [--grids 75 15 10 5]

Each object's position is replaced by the centre of the grid cell its centre falls in (a 5×5 grid
is what the `shapes-cells` conv stem sees), the object closest to / furthest from the question's
object is picked by those positions, ties broken at random (seed 0), and its shape compared with
the true answer. The accuracy is a ceiling for a model that knows where objects are only to the
cell. Prints one line per grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def ceiling(grid: float, split: str = "test", seed: int = 0) -> dict[str, float]:
    """{"closest", "furthest"}: accuracy of the answer picked from grid-cell-centre positions."""
    import numpy as np

    from mmtune.data.builtin import shapes as S

    a = S.load_arrays("shapes")[split]
    rng = np.random.default_rng(seed)
    cell = S.IMAGE_SIZE / grid
    right = {3: 0, 4: 0}
    total = {3: 0, 4: 0}
    for centres, shapes, questions in zip(a["centres"], a["shapes"], a["questions"], strict=True):
        coarse = (np.floor(centres / cell) + 0.5) * cell
        for kind, colour in questions:
            if kind not in (3, 4):
                continue
            d = ((coarse - coarse[colour]) ** 2).sum(1).astype(float)
            if kind == 3:
                d[colour] = np.inf
            best = d.min() if kind == 3 else d.max()
            pick = rng.choice(np.flatnonzero(d == best))
            right[kind] += S.SHAPES[shapes[pick]] == S.answer(kind, colour, centres, shapes)
            total[kind] += 1
    return {"closest": right[3] / total[3], "furthest": right[4] / total[4]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    ap.add_argument("--grids", type=float, nargs="+", default=[75, 15, 10, 5])
    args = ap.parse_args()
    for g in args.grids:
        c = ceiling(g, args.split)
        print(f"grid {g:g}×{g:g}: closest {c['closest']:.3f}  furthest {c['furthest']:.3f}")


if __name__ == "__main__":
    main()
