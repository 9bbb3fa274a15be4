"""WebDataset tar shards: write them from any pairs format, stream them for training, check.

`mmtune data shard` writes img2dataset's layout: `00000.tar`, … each with `00000_stats.json`
(`successes`: its sample count), plus `index.json` (all counts and class names, written last: its
presence marks a complete folder). A sample is the tar members sharing a key, as WebDataset
groups them: `KEY.jpg|png|…` (the original image bytes), `KEY.txt` (captions, one a line),
`KEY.json` ({"captions", "label", "id", "index"}) and `KEY.cls` (the label) when labelled.

Any standard shards are read too (`data.wds` finds and counts them): a folder of `.tar` or a
brace pattern, samples with any image extension and any of `.txt` / `.json` / `.cls`, as
img2dataset and CLIP_benchmark write them.

Streaming (`ShardStream`): each epoch the shard order is shuffled with the seed; rank r of W
reads shards r, r+W, …; samples pass through a seeded shuffle buffer. A rank's sample order
depends only on (seed, epoch, rank) — not on the number of loader workers, which split the
decoding of the batches among them — so a run resumes exactly at any batch of an epoch by
replaying the stream up to it without decoding. A rank whose shards run out before the epoch's
fixed number of batches starts another pass over them with a new shuffle. Each batch carries
the bad samples skipped while making it (`batch[SKIPPED]`, by reason), which the trainer adds up
into `data.shards.skipped.<reason>` of `metrics.json`.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmtune.data.formats import Record
from mmtune.data.images import BadImage, ImageTransform, load_image
from mmtune.data.wds import resolve, sample_key
from mmtune.errors import DataError

log = logging.getLogger("mmtune.data")
INDEX = "index.json"
SKIPPED = "_skipped"  # batch key: {reason: count} of the bad samples skipped making the batch
__all__ = ["ShardStream", "check_shards", "read_index", "read_shard", "write_shards"]
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "img")


# ---------------------------------------------------------------- writing


def _image_bytes(image) -> tuple[bytes, str]:
    """(bytes, extension) of a record's image: the file as it is, in-memory pixels as PNG."""
    if isinstance(image, np.ndarray):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return buf.getvalue(), "png"
    ext = Path(image).suffix.lower().lstrip(".") or "img"
    return Path(image).read_bytes(), "jpg" if ext == "jpeg" else ext


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def _add_sample(tar: tarfile.TarFile, key: str, rec: Record, i: int) -> None:
    data, ext = _image_bytes(rec.image)
    _add(tar, f"{key}.{ext}", data)
    _add(tar, f"{key}.txt", "\n".join(rec.captions).encode())
    meta = {"captions": rec.captions, "label": rec.label, "id": rec.id, "index": i}
    _add(tar, f"{key}.json", json.dumps(meta).encode())
    if rec.label is not None:
        _add(tar, f"{key}.cls", str(rec.label).encode())


def write_shards(
    records: list[Record], folder: str | Path, samples_per_shard: int = 1000, classes: list[str] | None = None
) -> dict:
    """Write records (screen them first) as tar shards + index.json; returns the index."""
    folder = Path(folder)
    if (folder / INDEX).exists():
        raise DataError(f"{folder} already holds shards; pick an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(records), samples_per_shard):
        name = f"{len(shards):05d}.tar"
        tmp = folder / f".{name}.tmp"
        with tarfile.open(tmp, "w") as tar:
            for i, rec in enumerate(records[start : start + samples_per_shard], start):
                _add_sample(tar, f"{i:09d}", rec, i)
        os.replace(tmp, folder / name)
        n = min(samples_per_shard, len(records) - start)
        stats = {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0}
        (folder / f"{name[:-4]}_stats.json").write_text(json.dumps(stats))
        shards.append({"name": name, "samples": n})
    index = {"format": "mmtune-shards/1", "samples": len(records), "shards": shards, "classes": classes}
    (folder / INDEX).write_text(json.dumps(index, indent=1))
    return index


# ---------------------------------------------------------------- reading


def read_index(folder: str | Path) -> dict:
    """The index of a complete shard folder; DataError naming what is wrong otherwise."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise DataError(f"{folder}: not a shard folder ({INDEX} missing; write one with `mmtune data shard`)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: corrupt ({e.msg})") from None
    for shard in index["shards"]:
        if not (Path(folder) / shard["name"]).is_file():
            raise DataError(f"{folder}: shard {shard['name']} listed in {INDEX} is missing")
    return index


def read_shard(path: str | Path) -> Iterator[dict]:
    """Samples of one tar shard in order: {"key", ext: bytes, …} for members sharing a key."""
    sample: dict = {}
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = sample_key(member.name)
                if sample and key != sample["key"]:
                    yield sample
                    sample = {}
                sample["key"] = key
                sample[ext] = tar.extractfile(member).read()
                if len(sample[ext]) != member.size:  # tarfile returns a cut-off member short
                    raise EOFError(f"{member.name} cut off")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: unreadable shard ({e})") from None
    if sample:
        yield sample


def _image_part(sample: dict) -> bytes | None:
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def sample_text(sample: dict, key: str) -> tuple[list[str], int | None]:
    """(captions, label) from a sample's .json, .txt and .cls members; BadImage names a bad one."""
    meta: dict = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            assert isinstance(meta, dict)
        except (ValueError, AssertionError):
            raise BadImage(key, "bad_json") from None
    captions = meta.get("captions")
    if captions is None and "txt" in sample:
        text = sample["txt"].decode("utf-8", errors="replace")
        captions = [c for c in text.splitlines() if c.strip()]
    if captions is None and isinstance(meta.get("caption"), str):  # img2dataset's json
        captions = [meta["caption"]]
    label = meta.get("label")
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise BadImage(key, "bad_cls", repr(sample["cls"][:20])) from None
    if captions is None and label is None:
        raise BadImage(key, "missing_text", "no .txt, .json or .cls member")
    return list(captions or []), label


def decode(sample: dict, transform: ImageTransform, rng, max_pixels: int, index: int) -> dict:
    """Raw sample → the item ImageTextDataset gives (pixel_values (3,S,S), caption, label…).

    Raises BadImage (reason: missing / not_image / truncated / too_large / bad_json / bad_cls /
    missing_text) for a bad sample.
    """
    captions, label = sample_text(sample, sample["key"])
    data = _image_part(sample)
    if data is None:
        raise BadImage(sample["key"], "missing", "no image member")
    if not data:
        raise BadImage(sample["key"], "empty")
    img = load_image(io.BytesIO(data), max_pixels)
    caption = captions[int(rng.integers(len(captions)))] if captions else ""
    return {
        "pixel_values": transform(img, rng),
        "caption": caption,
        "captions": captions,
        "label": -1 if label is None else label,
        "index": index,
    }


def _read_counted(path: Path, bad: Counter, found: list[dict] | None = None) -> Iterator[dict]:
    """read_shard, with a truncated or corrupt tar counted (and logged) instead of raised."""
    try:
        yield from read_shard(path)
    except DataError as e:
        if not bad["unreadable_shard"]:
            log.warning("%s; its remaining samples are skipped", e)
        bad["unreadable_shard"] += 1
        if found is not None:
            found.append({"sample": str(path), "reason": "unreadable_shard", "detail": str(e)})


def check_shards(
    source: str | Path, max_pixels: int = 40_000_000, found: list[dict] | None = None
) -> tuple[int, Counter]:
    """Decode every sample of a shard source (folder or pattern): (samples, bad counts by reason).

    `found`, when given, receives {"sample": "SHARD:KEY", "reason", "detail"} for every bad sample.
    """
    shards, _ = resolve(source)
    bad: Counter = Counter()
    found = [] if found is None else found
    total = 0
    for shard in shards:
        for sample in _read_counted(shard.path, bad, found):
            total += 1
            name = f"{shard.path}:{sample['key']}"
            try:
                item = decode(sample, ImageTransform(8), np.random.default_rng(0), max_pixels, 0)
            except BadImage as e:
                bad[e.reason] += 1
                found.append({"sample": name, "reason": e.reason, "detail": e.detail})
            else:
                if item["captions"] and not item["caption"].strip():
                    bad["empty_caption"] += 1
                    found.append({"sample": name, "reason": "empty_caption", "detail": ""})
    expected = sum(s.samples for s in shards)
    if total < expected:
        bad["missing_from_shards"] += expected - total
        found.append({"sample": str(source), "reason": "missing_from_shards", "detail": f"{expected - total} samples"})
    return total, bad


# ---------------------------------------------------------------- streaming


def shuffle_buffer(samples: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Yield samples in a random order using a buffer of `size` (WebDataset's shuffle)."""
    buf: list = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = int(rng.integers(size))
        buf[i], s = s, buf[i]
        yield s
    order = rng.permutation(len(buf))
    yield from (buf[i] for i in order)


class ShardStream(torch.utils.data.IterableDataset):
    """This rank's training batches from a shard source; `position()` picks epoch and start batch.

    Yields collated batches (collate runs in the workers); worker w of n decodes batches
    start+w, start+w+n, … of the rank's stream, which the DataLoader returns in order. A sample's
    number (its augmentation seed) is its position in the source: shard offset + rank in shard.
    """

    def __init__(
        self,
        source,
        transform: ImageTransform,
        collate: Callable,
        batch_size: int,
        seed: int = 0,
        buffer: int = 1000,
        rank: int = 0,
        world: int = 1,
        max_pixels: int = 40_000_000,
    ):
        self.shards, self.classes = resolve(source)
        if len(self.shards) < world:
            raise DataError(
                f"{source}: {len(self.shards)} shards for {world} processes; "
                "write at least one shard per process (smaller --samples-per-shard)"
            )
        starts = np.cumsum([0] + [s.samples for s in self.shards])[:-1].tolist()
        self.offsets = {s.path: int(n) for s, n in zip(self.shards, starts, strict=True)}
        self.transform, self.collate, self.batch_size = transform, collate, batch_size
        self.seed, self.buffer, self.rank, self.world = seed, buffer, rank, world
        self.max_pixels = max_pixels
        self.epoch, self.start, self.stop = 0, 0, 0
        self.bad: Counter = Counter()

    def __len__(self) -> int:
        return sum(s.samples for s in self.shards)

    def position(self, epoch: int, start: int, stop: int) -> ShardStream:
        """Yield batches [start, stop) of `epoch` next."""
        self.epoch, self.start, self.stop = epoch, start, stop
        return self

    def _my_shards(self, sweep: int) -> list[Path]:
        # which shards are this rank's is fixed for the epoch; their order changes each sweep
        paths = [s.path for s in self.shards]
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(paths))
        mine = [paths[i] for i in order][self.rank :: self.world]
        again = np.random.default_rng([self.seed, self.epoch, sweep, self.rank])
        return [mine[i] for i in again.permutation(len(mine))]

    def _numbered(self, path: Path) -> Iterator[tuple[int, dict]]:
        start = self.offsets[path]
        return ((start + i, s) for i, s in enumerate(_read_counted(path, self.bad)))

    def samples(self) -> Iterator[tuple[int, tuple[int, dict]]]:
        """(sweep, (sample number, raw sample)) of this rank's endless stream for the epoch."""
        for sweep in itertools.count():
            raw = (s for path in self._my_shards(sweep) for s in self._numbered(path))
            rng = np.random.default_rng([self.seed, self.epoch, sweep, self.rank])
            yield from ((sweep, s) for s in shuffle_buffer(raw, self.buffer, rng))

    def _decode(self, sweep: int, numbered: tuple[int, dict]) -> dict | None:
        index, sample = numbered
        rng = np.random.default_rng([self.seed, self.epoch, sweep, index])
        try:
            return decode(sample, self.transform, rng, self.max_pixels, index)
        except BadImage as e:
            if not self.bad[e.reason]:
                log.warning("skipping bad sample %s; further skips are counted", e)
            self.bad[e.reason] += 1
            return None

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        stream = self.samples()
        for k in range(self.stop):
            before = Counter(self.bad)
            raw = list(itertools.islice(stream, self.batch_size))
            if k < self.start or (k - self.start) % workers != worker:
                continue  # another worker's batch, or one consumed before the resume point
            batch = self.collate([self._decode(sweep, s) for sweep, s in raw])
            if isinstance(batch, dict):  # tasks' batches; the skips met making it travel with it
                batch[SKIPPED] = dict(self.bad - before)  # (workers share no counter): the trainer sums them
            yield batch
