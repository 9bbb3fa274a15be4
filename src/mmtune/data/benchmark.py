"""Write a labelled dataset in CLIP_benchmark's WebDataset layout (`mmtune data benchmark`).

The layout CLIP_benchmark's `wds/` datasets read:

    DIR/classnames.txt                          one class name a line, in label order
    DIR/zeroshot_classification_templates.txt   one prompt a line, `{c}` where the class goes
    DIR/<split>/nshards.txt                     the number of shards N
    DIR/<split>/0.tar … N-1.tar                 samples `s0000000.<image ext>` + `s0000000.cls`

Image files are copied byte for byte (their extension kept, `jpeg` as `jpg`); in-memory pixels
are stored as lossless WebP, CLIP_benchmark's default.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from mmtune.errors import DataError

CLASSNAMES, TEMPLATES, NSHARDS = (
    "classnames.txt",
    "zeroshot_classification_templates.txt",
    "nshards.txt",
)


def _image(image) -> tuple[bytes, str]:
    """(bytes, extension): a file as it is, pixels as lossless WebP."""
    if isinstance(image, np.ndarray):
        buf = io.BytesIO()
        Image.fromarray(image).convert("RGB").save(buf, format="WEBP", lossless=True)
        return buf.getvalue(), "webp"
    ext = Path(image).suffix.lower().lstrip(".").replace("jpeg", "jpg") or "webp"
    return Path(image).read_bytes(), ext


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def write_split(records, folder: Path, samples_per_shard: int) -> int:
    """Write one split's labelled records as `0.tar`, … and `nshards.txt`; the shard count."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = 0
    for start in range(0, len(records), samples_per_shard):
        tmp = folder / f".{shards}.tar.tmp"
        with tarfile.open(tmp, "w") as tar:
            for i, rec in enumerate(records[start : start + samples_per_shard], start):
                data, ext = _image(rec.image)
                _add(tar, f"s{i:07d}.{ext}", data)
                _add(tar, f"s{i:07d}.cls", str(rec.label).encode())
        tmp.replace(folder / f"{shards}.tar")
        shards += 1
    (folder / NSHARDS).write_text(f"{shards}\n")
    return shards


def write_benchmark(
    splits: dict, classes: list[str], templates: list[str], out: str | Path, samples_per_shard: int = 10_000
) -> dict:
    """Write {split: records} with class names and `{}`-style templates; {split: samples}."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty: pick a new folder")
    if not classes:
        raise DataError("a zero-shot benchmark needs class labels; this dataset has none")
    for name, records in splits.items():
        unlabelled = next((r for r in records if r.label is None), None)
        if unlabelled is not None:
            raise DataError(f"{name} split: record {unlabelled.id} has no label")
    out.mkdir(parents=True, exist_ok=True)
    (out / CLASSNAMES).write_text("".join(f"{c}\n" for c in classes))
    prompts = [t.replace("{}", "{c}") for t in templates]  # CLIP_benchmark's placeholder
    (out / TEMPLATES).write_text("".join(f"{t}\n" for t in prompts))
    for name, records in splits.items():
        write_split(records, out / name, samples_per_shard)
    return {name: len(records) for name, records in splits.items()}
