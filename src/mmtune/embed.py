"""Batch embedding of images and texts into a Parquet file (id, modality, path, caption, vector).

Work is written in parts (`OUT.parts/part-NNNNN.parquet`, each atomically) so an interrupted run
resumes at the first missing part; when all parts exist they are joined into `OUT` and the parts
folder is removed. Bad images are skipped and counted by reason; empty texts likewise.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmtune.data.images import IMAGE_EXTENSIONS, BadImage, load_image, member_bytes
from mmtune.data.wds import shard_member
from mmtune.errors import DataError

log = logging.getLogger("mmtune.embed")

MANIFEST = "manifest.json"


@dataclass
class Item:
    """One thing to embed: an image file (path, optional caption) or a text (caption)."""

    modality: str  # "image" | "text"
    id: str
    path: str | None = None
    caption: str | None = None


@dataclass
class EmbedReport:
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    resumed_parts: int = 0
    output: Path | None = None


def _first_caption(folder_image: Path) -> str | None:
    txt = folder_image.with_suffix(".txt")
    if not txt.is_file():
        return None
    lines = [t.strip() for t in txt.read_text(errors="replace").splitlines() if t.strip()]
    return lines[0] if lines else None


def _sample_caption(sample: dict) -> str | None:
    try:
        meta = json.loads(sample.get("json", b"{}"))
        captions = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
    except (json.JSONDecodeError, AttributeError, TypeError):
        captions = []
    if not captions and "txt" in sample:  # img2dataset: the caption in KEY.txt
        captions = sample["txt"].decode("utf-8", errors="replace").splitlines()
    return next((c for c in captions if c.strip()), None)


def shard_items(source: str | Path) -> list[Item]:
    """The images of WebDataset shards (a folder of .tar or a brace pattern): `SHARD.tar#MEMBER`."""
    from mmtune.data.shards import IMAGE_EXTS, read_shard
    from mmtune.data.wds import resolve

    items = []
    for shard in resolve(source)[0]:
        for sample in read_shard(shard.path):
            ext = next((e for e in IMAGE_EXTS if e in sample), "")
            member = f"{sample['key']}.{ext}" if ext else f"{sample['key']}.jpg"  # absent: counted
            items.append(
                Item("image", f"{shard.path.name}/{sample['key']}", f"{shard.path}#{member}", _sample_caption(sample))
            )
    return items


class ImageSource:
    """Opens an item's image: a file path, or `SHARD.tar#MEMBER` read from the shard by offset
    (each tar's headers are read once; safe to share between threads)."""

    def read_member(self, path: str, parts: tuple[str, str] | None = None) -> bytes:
        """The bytes of shard member `path` (`SHARD.tar#MEMBER`; `parts`: its `shard_member`, when
        the caller has it already); BadImage when it is missing."""
        return member_bytes(path, parts)

    def __call__(self, path: str):
        parts = shard_member(path)
        if parts is None:
            return path
        data = io.BytesIO(self.read_member(path, parts))
        data.name = path  # named in BadImage messages
        return data

    def close(self) -> None:
        """Nothing is held open."""


def image_items(source: str | Path, fmt: str = "auto", **columns) -> list[Item]:
    """Images of a folder (recursively; a same-stem .txt gives the caption), a pairs file, or
    WebDataset shards (a folder of .tar, a brace pattern, `mmtune data shard`'s folder)."""
    from mmtune.data.formats import detect_format, read_coco, read_table
    from mmtune.data.shards import INDEX
    from mmtune.data.wds import is_shard_source

    src = Path(source)
    if (src.is_dir() and (src / INDEX).is_file()) or is_shard_source(source):
        return shard_items(source)
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt == "folder":
        paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise DataError(f"{src}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        # absolute paths: the file is read later from wherever search or serve runs
        return [Item("image", str(p.relative_to(src)), str(p.resolve()), _first_caption(p)) for p in paths]
    table = read_coco(src) if fmt == "coco" else read_table(src, fmt, **columns)
    return [
        Item("image", r.id, str(Path(r.image).resolve()), r.captions[0] if r.captions else None) for r in table.records
    ]


def text_items(source: str | Path, fmt: str = "auto", **columns) -> list[Item]:
    """Texts: one per line of a .txt file, or the distinct captions of a pairs file / folder."""
    src = Path(source)
    if src.suffix.lower() == ".txt" and src.is_file():
        lines = src.read_text(encoding="utf-8", errors="replace").splitlines()
        return [Item("text", f"text:{n}", None, t) for n, t in enumerate(lines, 1)]
    from mmtune.data.formats import detect_format, read_caption_folder, read_coco, read_table

    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt == "folder":
        table = read_caption_folder(src)
    elif fmt == "coco":
        table = read_coco(src)
    else:
        table = read_table(src, fmt, **{k: v for k, v in columns.items() if k != "image_root"})
    caps = dict.fromkeys(c for r in table.records for c in r.captions)
    return [Item("text", f"text:{n}", None, c) for n, c in enumerate(caps, 1)]


def _fingerprint(items: list[Item], checkpoint: str) -> str:
    h = hashlib.sha256(str(checkpoint).encode())
    for it in items:
        h.update(f"{it.modality}\0{it.id}\0{it.path}\0{it.caption}\n".encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def _embed_chunk(model, processor, items: list[Item], max_pixels: int, skipped, earlier, open_):
    """Embeddings (M, D) of the usable items of a chunk, with the items kept."""
    device = next(model.parameters()).device
    images, texts = [], []
    for it in items:
        if it.modality == "image":
            try:
                images.append((it, load_image(open_(it.path), max_pixels)))
            except BadImage as e:
                if not skipped and not earlier:
                    log.warning("skipping bad image %s (%s); further skips are counted", e.path, e.reason)
                skipped[e.reason] += 1
        elif it.caption is None or not it.caption.strip():
            skipped["empty_text"] += 1
        else:
            texts.append(it)
    kept, vecs = [], []
    if images:
        px = processor.images([im for _, im in images]).to(device)
        vecs.append(model.encode_image(px).float().cpu())
        kept += [it for it, _ in images]
    if texts:
        tok = {k: v.to(device) for k, v in processor.tokenize([t.caption for t in texts]).items()}
        vecs.append(model.encode_text(**tok).float().cpu())
        kept += texts
    return kept, (torch.cat(vecs).numpy() if vecs else None)


def _table(items: list[Item], vectors: np.ndarray | None, dim: int | None):
    import pyarrow as pa

    if vectors is None:
        vectors = np.zeros((0, dim or 1), np.float32)
    d = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1))
    return pa.table(
        {
            "id": pa.array([it.id for it in items], pa.string()),
            "modality": pa.array([it.modality for it in items], pa.string()),
            "path": pa.array([it.path for it in items], pa.string()),
            "caption": pa.array([it.caption for it in items], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, d),
        }
    )


def _write_part(parts: Path, n: int, table, meta: dict) -> None:
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata({"mmtune_part": json.dumps(meta)})
    tmp = parts / f".part-{n:05d}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, parts / f"part-{n:05d}.parquet")


def _done_parts(parts: Path, fingerprint: str) -> dict[int, dict]:
    """Parts already written for this exact input (else the folder is started afresh)."""
    import pyarrow.parquet as pq

    manifest = parts / MANIFEST
    if parts.is_dir():
        try:
            same = json.loads(manifest.read_text()).get("fingerprint") == fingerprint
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            log.warning("%s holds parts of other input: starting afresh", parts)
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"fingerprint": fingerprint}))
    done = {}
    for p in sorted(parts.glob("part-*.parquet")):
        try:
            md = pq.read_schema(p).metadata or {}
            done[int(p.stem.split("-")[1])] = json.loads(md[b"mmtune_part"])
        except Exception:  # a damaged part is simply redone
            p.unlink()
    return done


def embed_items(
    model,
    processor,
    items: list[Item],
    out: str | Path,
    batch_size: int = 64,
    max_pixels: int = 40_000_000,
    progress: bool = True,
    checkpoint: str = "",
    part_size: int = 4096,
) -> EmbedReport:
    """Embed `items` in batches into the Parquet file `out`, resuming from parts already written.

    Every `part_size` items are saved as one part: an interruption loses at most one part.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = out.with_name(out.name + ".parts")
    done = _done_parts(parts, _fingerprint(items, checkpoint))
    report = EmbedReport(resumed_parts=len(done), output=out)
    for meta in done.values():
        report.skipped.update(meta["skipped"])
    n_parts = (len(items) + part_size - 1) // part_size
    model.eval()
    bar = tqdm(total=len(items), desc="embedding", disable=not progress, unit="item")
    bar.update(sum(m["end"] - m["start"] for m in done.values()))
    dim, open_ = None, ImageSource()
    try:
        for n in range(n_parts):
            if n in done:
                continue
            start, end = n * part_size, min(len(items), (n + 1) * part_size)
            skipped, kept, vecs = Counter(), [], []
            for b in range(start, end, batch_size):
                chunk = items[b : min(end, b + batch_size)]
                k, v = _embed_chunk(model, processor, chunk, max_pixels, skipped, report.skipped, open_)
                kept += k
                vecs += [] if v is None else [v]
                bar.update(len(chunk))
            vecs = np.concatenate(vecs) if vecs else None
            dim = dim or (None if vecs is None else vecs.shape[1])
            meta = {"start": start, "end": end, "skipped": dict(skipped)}
            _write_part(parts, n, _table(kept, vecs, dim), meta)
            report.skipped.update(skipped)
    finally:
        open_.close()
        bar.close()
    tables = [pq.read_table(p) for p in sorted(parts.glob("part-*.parquet"))]
    tables = [t.replace_schema_metadata(None) for t in tables if t.num_rows]
    if not tables:
        raise DataError(f"nothing to embed: every item was skipped ({dict(report.skipped)})")
    table = pa.concat_tables(tables)
    report.rows = table.num_rows
    info = {
        "checkpoint": str(checkpoint),
        "dim": table["vector"].type.list_size,
        "rows": report.rows,
        "skipped": dict(report.skipped),
    }
    table = table.replace_schema_metadata({"mmtune": json.dumps(info)})
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    shutil.rmtree(parts)
    return report
