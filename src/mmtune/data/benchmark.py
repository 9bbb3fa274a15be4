"""CLIP_benchmark's WebDataset layout: write a labelled dataset in it (`mmtune data benchmark`),
read one for evaluation (`mmtune eval --benchmark`).

The layout CLIP_benchmark's `wds/` datasets read:

    DIR/classnames.txt                          one class name a line, in label order
    DIR/zeroshot_classification_templates.txt   one prompt a line, `{c}` where the class goes
    DIR/<split>/nshards.txt                     the number of shards N
    DIR/<split>/0.tar … N-1.tar                 samples `s0000000.<image ext>` + `s0000000.cls`

Image files are copied byte for byte (their extension kept, `jpeg` as `jpg`); in-memory pixels
are stored as lossless WebP, CLIP_benchmark's default. Retrieval datasets (flickr30k, mscoco)
have the same layout with `.txt` captions (one a line) instead of `.cls`, and no class names.
Read back, each image stays in its shard (`N.tar#KEY.webp`, decoded when it is evaluated).

Multi-label datasets (CLIP_benchmark's voc2007_multilabel) hold several classes per sample: as
CLIP_benchmark writes them, a `.npy` member with a multi-hot vector (and `dataset_type.txt` saying
`multilabel`); or a `.cls` listing the class indices (`3,7` or `3 7`). They are read into
`Record.labels` and scored by mean average precision.
"""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from mmtune.data.formats import Record, Table
from mmtune.data.images import BadImage
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


def is_benchmark(path: str | Path) -> bool:
    """A folder in CLIP_benchmark's layout: class names, templates or a `SPLIT/nshards.txt`."""
    p = Path(path)
    if not p.is_dir():
        return False
    return (p / CLASSNAMES).is_file() or (p / TEMPLATES).is_file() or any(p.glob(f"*/{NSHARDS}"))


def _lines(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_benchmark(folder: str | Path, split: str = "test") -> tuple[Table, list[str] | None]:
    """(records of one split, with class names and bad samples counted by reason; the prompt
    templates in mmtune's `{}` form, None when the folder has none)."""
    from mmtune.data.shards import IMAGE_EXTS, sample_text
    from mmtune.data.wds import shard_paths

    folder = Path(folder)
    if not (folder / split / NSHARDS).is_file():
        have = sorted(p.parent.name for p in folder.glob(f"*/{NSHARDS}"))
        raise DataError(f"{folder}: no split '{split}' ({split}/{NSHARDS} missing; splits here: {have or 'none'})")
    classes = _lines(folder / CLASSNAMES)
    prompts = _lines(folder / TEMPLATES)
    templates = None if prompts is None else [t.replace("{c}", "{}") for t in prompts]
    records: list[Record] = []
    bad: Counter = Counter()
    for path in shard_paths(folder / split):
        for key, members in _samples(path, bad):
            image = next((f"{path}#{members[e]}" for e in IMAGE_EXTS if e in members), None)
            try:
                labels = _multilabel(members, key)
                captions, label = sample_text(members, key) if labels is None else ([], None)
                if image is None:
                    raise BadImage(key, "missing", "no image member")
                n = len(classes) if classes is not None else None
                if n is not None and any(not 0 <= c < n for c in ([label] if label is not None else labels or [])):
                    raise BadImage(key, "bad_cls", f"label {label if labels is None else labels} with {n} classes")
            except BadImage as e:
                bad[e.reason] += 1
                continue
            ident = f"{path.name}/{key}"
            records.append(Record(image=image, captions=captions, label=label, id=ident, labels=labels))
    return Table(records, classes, dict(bad)), templates


def _multilabel(members: dict, key: str) -> tuple[int, ...] | None:
    """The classes of a multi-label sample (a multi-hot `.npy`, or a `.cls` of several indices),
    taking its `.npy`/`.cls` out of `members`; None for a single-label sample."""
    if "npy" in members:
        try:
            hot = np.load(io.BytesIO(members.pop("npy")), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            raise BadImage(key, "bad_cls", "unreadable .npy") from None
        if hot.ndim != 1:
            raise BadImage(key, "bad_cls", f".npy of shape {hot.shape}, not a multi-hot vector")
        members.pop("cls", None)
        return tuple(int(i) for i in np.flatnonzero(hot > 0))
    parts = members.get("cls", b"").replace(b",", b" ").split()
    if len(parts) < 2:
        return None
    try:
        labels = tuple(sorted({int(p) for p in parts}))
    except ValueError:
        raise BadImage(key, "bad_cls", repr(members["cls"][:20])) from None
    del members["cls"]
    return labels


def _samples(path: Path, bad: Counter):
    """(key, {ext: bytes of a text member, or the image member's name}) of one tar, in order;
    a damaged tar counts `unreadable_shard` and serves the samples before the damage."""
    from mmtune.data.shards import IMAGE_EXTS
    from mmtune.data.wds import sample_key

    key, members = None, {}
    try:
        with tarfile.open(path, "r") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = sample_key(m.name)
                if members and k != key:
                    yield key, members
                    members = {}
                key = k
                members[ext] = m.name if ext in IMAGE_EXTS else tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError):
        bad["unreadable_shard"] += 1
    if members:
        yield key, members
