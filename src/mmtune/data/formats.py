"""Readers of image–text data: CSV/TSV/JSONL pairs, COCO captions JSON, a folder of images + .txt."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmtune.data.images import IMAGE_EXTENSIONS
from mmtune.data.prompts import sort_classes
from mmtune.data.video import VIDEO_EXTENSIONS
from mmtune.errors import DataError


@dataclass
class Record:
    """One image with its captions (an image may have several) and an optional class label."""

    image: str | np.ndarray  # a file path, or pixels held in memory (built-in data)
    captions: list[str] = field(default_factory=list)
    label: int | None = None
    id: str = ""
    labels: tuple[int, ...] | None = None  # several classes (a multi-label benchmark); `label` is then None


@dataclass
class Table:
    """Records read from one source, with the class names when labels were read."""

    records: list[Record]
    classes: list[str] | None = None
    skipped: dict[str, int] = field(default_factory=dict)


MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS  # what caption and class folders hold


def detect_format(path: str | Path) -> str:
    """Pick a reader from the path: a folder of images with .txt captions (`folder`) or of class
    sub-folders (`imagefolder`), .json (COCO), .jsonl, .tsv, else CSV (sniffed)."""
    p = Path(path)
    if p.is_dir():
        entries = [e for e in p.iterdir() if not e.name.startswith(".")]
        own_images = any(e.is_file() and e.suffix.lower() in MEDIA_EXTENSIONS for e in entries)
        return "folder" if own_images or not any(e.is_dir() for e in entries) else "imagefolder"
    if not p.exists():
        raise DataError(f"data not found: {p}")
    suffix = p.suffix.lower()
    return {".json": "coco", ".jsonl": "jsonl", ".tsv": "tsv"}.get(suffix, "csv")


def _sniff_delimiter(sample: str, path: Path) -> str:
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        # One column or a quoted header only: fall back on counting candidate separators.
        header = sample.splitlines()[0] if sample else ""
        counts = {d: header.count(d) for d in ",\t;|"}
        best = max(counts, key=counts.get)
        if counts[best] == 0:
            raise DataError(f"{path}: cannot detect the column separator of the header") from None
        return best


def read_jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; DataError naming the line otherwise."""
    rows = []
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: each line must be a JSON object")
        rows.append((n, row))
    return rows


def _read_rows(path: Path, fmt: str) -> list[dict]:
    if fmt == "jsonl":
        return [row for _, row in read_jsonl_rows(path)]
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    delim = "\t" if fmt == "tsv" else _sniff_delimiter(text[:8192], path)
    return list(csv.DictReader(text.splitlines(), delimiter=delim))


def _check_columns(rows: list[dict], needed: list[str], path: Path) -> None:
    have = list(rows[0].keys()) if rows else []
    missing = [c for c in needed if c not in have]
    if missing:
        raise DataError(
            f"{path}: column {', '.join(repr(m) for m in missing)} not found; "
            f"the file has columns {have} (set data.image_column / data.caption_column)"
        )


def read_table(
    path: str | Path,
    fmt: str = "auto",
    image_column: str = "image",
    caption_column: str | None = "caption",
    label_column: str | None = None,
    image_root: str | Path | None = None,
    classes: list[str] | None = None,
    source: str | None = None,
) -> Table:
    """Read a CSV/TSV/JSONL of image paths with captions and/or labels; rows of one image merge.

    Labels index `classes` (named by `source` in errors), else their distinct values sorted
    (numerically when all are integers)."""
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in ("csv", "tsv", "jsonl"):
        raise DataError(f"{path}: read_table reads csv/tsv/jsonl, not {fmt}")
    rows = _read_rows(path, fmt)
    if not rows:
        raise DataError(f"{path}: no rows")
    needed = [image_column] + [c for c in (caption_column, label_column) if c]
    _check_columns(rows, needed, path)
    root = Path(image_root) if image_root else path.parent
    if label_column and classes is None:
        classes = sort_classes(str(r[label_column]).strip() for r in rows)
    index = {c: i for i, c in enumerate(classes or [])}
    by_image: dict[str, Record] = {}
    for n, row in enumerate(rows, 1):
        img = str(row[image_column]).strip()
        rec = by_image.get(img)
        if rec is None:
            label = None
            if label_column:
                name = str(row[label_column]).strip()
                if name not in index:
                    known = f"in {source}" if source else f"one of {classes}"
                    raise DataError(f"{path}: row {n}: label {name!r} is not {known}")
                label = index[name]
            rec = by_image[img] = Record(image=str(root / img), label=label, id=img)
        cap = row.get(caption_column) if caption_column else None
        if cap is not None:
            rec.captions.append(str(cap))
    return Table(list(by_image.values()), classes)


def read_coco(path: str | Path, image_root: str | Path | None = None) -> Table:
    """Read COCO-captions JSON (`images` + `annotations`); images without captions are dropped."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"{path}: COCO captions JSON needs an '{key}' list")
    root = Path(image_root) if image_root else path.parent
    recs: dict[object, Record] = {}
    for im in data["images"]:
        if "id" not in im or "file_name" not in im:
            raise DataError(f"{path}: image entry {im!r} needs 'id' and 'file_name'")
        recs[im["id"]] = Record(image=str(root / im["file_name"]), id=str(im["file_name"]))
    for ann in data["annotations"]:
        rec = recs.get(ann.get("image_id"))
        if rec is None:
            raise DataError(f"{path}: annotation {ann!r} names an unknown image_id")
        rec.captions.append(str(ann.get("caption", "")))
    kept = [r for r in recs.values() if r.captions]
    skipped = {"no_caption": len(recs) - len(kept)} if len(kept) < len(recs) else {}
    return Table(kept, None, skipped)


def read_caption_folder(folder: str | Path) -> Table:
    """Read a folder (recursively) of images, each with a same-stem .txt caption beside it."""
    folder = Path(folder)
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in MEDIA_EXTENSIONS)
    if not images:
        raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or videos")
    records, no_caption = [], 0
    for p in images:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            no_caption += 1
            continue
        lines = [t.strip() for t in txt.read_text(errors="replace").splitlines() if t.strip()]
        records.append(Record(image=str(p), captions=lines, id=str(p.relative_to(folder))))
    return Table(records, None, {"no_caption": no_caption} if no_caption else {})


def read_image_folder(folder: str | Path, classes: list[str] | None = None, source: str | None = None) -> Table:
    """Read an ImageFolder: one sub-folder of images (or video clips) per class, its name the label.

    With `classes` (`data.classnames`, or the training classes for a validation/test folder;
    named by `source` in errors) every sub-folder must name one of them, and label = its position;
    classes without a folder simply have no samples there. Without, the folder names sorted
    (numerically when all are integers: 0, 1, 2, …, 10).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (an ImageFolder has one sub-folder per class)")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataError(f"{folder}: no class sub-folders (an ImageFolder has one per class)")
    names = [p.name for p in subdirs]
    if classes is None:
        classes = sort_classes(names)
    unknown = [n for n in names if n not in classes]
    if unknown:
        known = f"in {source}" if source else f"one of {classes}"
        raise DataError(f"{folder}: class folder {unknown[0]!r} is not {known}")
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for sub in subdirs:
        images = sorted(p for p in sub.rglob("*") if p.suffix.lower() in MEDIA_EXTENSIONS)
        if not images:
            raise DataError(
                f"{sub}: class folder '{sub.name}' has no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}) or videos; remove it or add images"
            )
        records += [Record(image=str(p), label=index[sub.name], id=str(p.relative_to(folder))) for p in images]
    return Table(records, list(classes))
