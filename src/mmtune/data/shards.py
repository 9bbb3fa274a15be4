"""WebDataset-style tar shards: write them from any pairs format, stream them for training, check.

A shard folder holds `shard-00000.tar`, … and `index.json` (sample counts, written last: its
presence marks a complete folder). Each sample is three tar members sharing a key, as WebDataset
reads them: `KEY.jpg|png|…` (the original image bytes), `KEY.txt` (captions, one a line) and
`KEY.json` ({"captions", "label", "id", "index"}).

Streaming (`ShardStream`): each epoch the shard order is shuffled with the seed; rank r of W
reads shards r, r+W, …; samples pass through a seeded shuffle buffer. A rank's sample order
depends only on (seed, epoch, rank) — not on the number of loader workers, which split the
decoding of the batches among them — so a run resumes exactly at any batch of an epoch by
replaying the stream up to it without decoding. A rank whose shards run out before the epoch's
fixed number of batches starts another pass over them with a new shuffle.
"""

from __future__ import annotations

import io
import itertools
import json
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
from mmtune.errors import DataError

INDEX = "index.json"
__all__ = ["ShardStream", "check_shards", "read_index", "read_shard", "write_shards"]


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


def write_shards(records: list[Record], folder: str | Path, samples_per_shard: int = 1000,
                 classes: list[str] | None = None) -> dict:  # fmt: skip
    """Write records (screen them first) as tar shards + index.json; returns the index."""
    folder = Path(folder)
    if (folder / INDEX).exists():
        raise DataError(f"{folder} already holds shards; pick an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(records), samples_per_shard):
        name = f"shard-{len(shards):05d}.tar"
        tmp = folder / f".{name}.tmp"
        with tarfile.open(tmp, "w") as tar:
            for i, rec in enumerate(records[start : start + samples_per_shard], start):
                key = f"{i:09d}"
                data, ext = _image_bytes(rec.image)
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.txt", "\n".join(rec.captions).encode())
                meta = {"captions": rec.captions, "label": rec.label, "id": rec.id, "index": i}
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        os.replace(tmp, folder / name)
        shards.append({"name": name, "samples": min(samples_per_shard, len(records) - start)})
    index = {"format": "mmtune-shards/1", "samples": len(records), "shards": shards,
             "classes": classes}  # fmt: skip
    (folder / INDEX).write_text(json.dumps(index, indent=1))
    return index


# ---------------------------------------------------------------- reading


def read_index(folder: str | Path) -> dict:
    """The index of a complete shard folder; DataError naming what is wrong otherwise."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise DataError(f"{folder}: not a shard folder ({INDEX} missing; write one with "
                        "`mmtune data shard`)")  # fmt: skip
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
                key, _, ext = Path(member.name).name.partition(".")
                if sample and key != sample["key"]:
                    yield sample
                    sample = {}
                sample["key"] = key
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: unreadable shard ({e})") from None
    if sample:
        yield sample


def _image_part(sample: dict) -> bytes | None:
    return next((v for k, v in sample.items() if k not in ("key", "txt", "json")), None)


def decode(sample: dict, transform: ImageTransform, rng, max_pixels: int) -> dict:
    """Raw sample → the item ImageTextDataset gives (pixel_values (3,S,S), caption, label…).

    Raises BadImage (reason: missing / not_image / truncated / too_large) for a bad image.
    """
    meta = json.loads(sample["json"])
    data = _image_part(sample)
    if data is None:
        raise BadImage(sample["key"], "missing", "no image member")
    if not data:
        raise BadImage(sample["key"], "empty")
    img = load_image(io.BytesIO(data), max_pixels)
    captions = meta["captions"]
    caption = captions[int(rng.integers(len(captions)))] if captions else ""
    label = meta.get("label")
    return {"pixel_values": transform(img, rng), "caption": caption, "captions": captions,
            "label": -1 if label is None else label, "index": meta["index"]}  # fmt: skip


def check_shards(folder: str | Path, max_pixels: int = 40_000_000) -> tuple[int, Counter]:
    """Decode every sample of a shard folder: (samples, bad counts by reason)."""
    index = read_index(folder)
    bad: Counter = Counter()
    total = 0
    for shard in index["shards"]:
        for sample in read_shard(Path(folder) / shard["name"]):
            total += 1
            try:
                item = decode(sample, ImageTransform(8), np.random.default_rng(0), max_pixels)
            except BadImage as e:
                bad[e.reason] += 1
            except (KeyError, json.JSONDecodeError):
                bad["bad_metadata"] += 1
            else:
                if not item["caption"].strip():
                    bad["empty_caption"] += 1
    if total != index["samples"]:
        bad["missing_from_shards"] += max(0, index["samples"] - total)
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
    """This rank's training batches from a shard folder; `position()` picks epoch and start batch.

    Yields collated batches (collate runs in the workers); worker w of n decodes batches
    start+w, start+w+n, … of the rank's stream, which the DataLoader returns in order.
    """

    def __init__(self, folder, transform: ImageTransform, collate: Callable, batch_size: int,
                 seed: int = 0, buffer: int = 1000, rank: int = 0, world: int = 1,
                 max_pixels: int = 40_000_000):  # fmt: skip
        self.folder, self.index = Path(folder), read_index(folder)
        if len(self.index["shards"]) < world:
            raise DataError(f"{folder}: {len(self.index['shards'])} shards for {world} processes; "
                            "write at least one shard per process (smaller --samples-per-shard)")  # fmt: skip
        self.transform, self.collate, self.batch_size = transform, collate, batch_size
        self.seed, self.buffer, self.rank, self.world = seed, buffer, rank, world
        self.max_pixels = max_pixels
        self.epoch, self.start, self.stop = 0, 0, 0
        self.bad: Counter = Counter()

    def __len__(self) -> int:
        return self.index["samples"]

    def position(self, epoch: int, start: int, stop: int) -> ShardStream:
        """Yield batches [start, stop) of `epoch` next."""
        self.epoch, self.start, self.stop = epoch, start, stop
        return self

    def _my_shards(self, sweep: int) -> list[str]:
        # which shards are this rank's is fixed for the epoch; their order changes each sweep
        names = [s["name"] for s in self.index["shards"]]
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(names))
        mine = [names[i] for i in order][self.rank :: self.world]
        again = np.random.default_rng([self.seed, self.epoch, sweep, self.rank])
        return [mine[i] for i in again.permutation(len(mine))]

    def samples(self) -> Iterator[tuple[int, dict]]:
        """(sweep, raw sample) of this rank's endless stream for the epoch, shuffled."""
        for sweep in itertools.count():
            raw = (s for name in self._my_shards(sweep) for s in read_shard(self.folder / name))
            rng = np.random.default_rng([self.seed, self.epoch, sweep, self.rank])
            yield from ((sweep, s) for s in shuffle_buffer(raw, self.buffer, rng))

    def _decode(self, sweep: int, sample: dict) -> dict | None:
        index = json.loads(sample["json"])["index"]
        rng = np.random.default_rng([self.seed, self.epoch, sweep, index])
        try:
            return decode(sample, self.transform, rng, self.max_pixels)
        except BadImage as e:
            self.bad[e.reason] += 1
            return None

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        stream = self.samples()
        for k in range(self.stop):
            raw = list(itertools.islice(stream, self.batch_size))
            if k < self.start or (k - self.start) % workers != worker:
                continue  # another worker's batch, or one consumed before the resume point
            yield self.collate([self._decode(sweep, s) for sweep, s in raw])
