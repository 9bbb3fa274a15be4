"""Video clips: safe probing and decoding (PyAV), seeded frame sampling, a decoded-frame cache.

A clip is decoded once into a *pool* of at most `data.frame_pool` evenly spaced frames (resized to
what the model needs), kept in a bounded in-memory cache; each item then samples `data.frames` of
the pool — the middle of T equal segments for evaluation, a random point in each for training —
from a Generator seeded by (seed, epoch, index), so a sample is the same whichever worker makes it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmtune.data.images import BadImage, ImageTransform

log = logging.getLogger("mmtune.data")

VIDEO_EXTENSIONS = {".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v"}


class BadVideo(BadImage):
    """An unusable video; reason: missing/empty/not_video/zero_length/too_long/too_large."""


def is_video(source) -> bool:
    """A path whose extension names a video container."""
    return isinstance(source, str | Path) and Path(source).suffix.lower() in VIDEO_EXTENSIONS


def _av():
    try:
        import av
    except ImportError:
        from mmtune.errors import UserError

        raise UserError("video data needs PyAV: pip install 'mmtune[video]'") from None
    return av


def sample_frames(n: int, frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices of `frames` frames spread uniformly over a clip of `n`: the middle of each of
    `frames` equal segments, or (with `rng`, training jitter) a random point within each; all `n`
    frames, in order, when the clip has no more than `frames`."""
    if n <= frames:
        return np.arange(n)
    edges = np.linspace(0.0, n, frames + 1)
    offset = 0.5 if rng is None else rng.random(frames)
    pos = edges[:-1] + offset * (edges[1:] - edges[:-1])
    return np.minimum(np.floor(pos).astype(np.int64), n - 1)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise BadVideo(path, "missing")
    if os.path.getsize(path) == 0:
        raise BadVideo(path, "empty")


def _count_frames(av, path: str) -> int:
    """Frames of the first video stream: from the container, else by reading packets (no decode)."""
    with av.open(path) as c:
        stream = c.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for p in c.demux(stream) if p.size)


def _seconds(stream, container) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def probe_video(path: str, max_seconds: float = 600.0, max_pixels: int = 40_000_000) -> int:
    """The number of frames of a usable video; BadVideo (with a reason) otherwise. Reads the
    header and packets and decodes the first frame: an undecodable stream is found here."""
    path = str(path)
    _check_file(path)
    av = _av()
    try:
        with av.open(path) as c:
            if not c.streams.video:
                raise BadVideo(path, "not_video", "no video stream")
            stream = c.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > max_pixels:
                raise BadVideo(path, "too_large", f"{w}x{h} pixels > data.max_image_pixels {max_pixels}")
            seconds = _seconds(stream, c)
            if seconds is not None and seconds > max_seconds:
                raise BadVideo(path, "too_long", f"{seconds:.1f} s > data.max_video_seconds {max_seconds}")
            first = next(iter(c.decode(stream)), None)
            if first is None:
                raise BadVideo(path, "zero_length", "no frame decodes")
        n = _count_frames(av, path)
    except BadVideo:
        raise
    except av.error.EOFError:  # a container whose stream holds nothing
        raise BadVideo(path, "zero_length", "no frame decodes") from None
    except (av.FFmpegError, OSError, ValueError, IndexError, StopIteration) as e:
        raise BadVideo(path, "not_video", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if n == 0:
        raise BadVideo(path, "zero_length")
    return n


def _shrink(img: Image.Image, size: int | None) -> Image.Image:
    """Shorter side down to `size` (never up): a cached pool holds no more pixels than needed."""
    w, h = img.size
    if size is None or min(w, h) <= size:
        return img
    scale = size / min(w, h)
    return img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)


def decode_pool(path: str, pool: int, size: int | None = None, max_seconds: float = 600.0) -> np.ndarray:
    """(P, H, W, 3) uint8: at most `pool` frames evenly spread over the clip (middle of each
    segment), shorter side at most `size`; BadVideo when nothing decodes or the clip runs too long."""
    path = str(path)
    _check_file(path)
    av = _av()
    try:
        n = _count_frames(av, path)
        wanted = set(sample_frames(n, pool).tolist())
        last = max(wanted, default=-1)
        out = []
        with av.open(path) as c:
            stream = c.streams.video[0]
            for i, frame in enumerate(c.decode(stream)):
                if frame.time is not None and frame.time > max_seconds:
                    raise BadVideo(path, "too_long", f"a frame at {frame.time:.1f} s > data.max_video_seconds")
                if i in wanted:
                    out.append(np.asarray(_shrink(frame.to_image(), size), dtype=np.uint8))
                if i >= last:
                    break
    except BadVideo:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:
        raise BadVideo(path, "not_video", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if not out:
        raise BadVideo(path, "zero_length", "no frame decodes")
    return np.stack(out)


class FrameCache:
    """Decoded pools by (path, pool, size), least recently used dropped beyond `max_bytes`.

    Per process: with loader workers each worker keeps its own (they live for one epoch)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.decodes = 0  # pools decoded (cache misses), for tests and logs
        self.lock = threading.Lock()

    def get(self, path: str, pool: int, size: int | None, max_seconds: float) -> np.ndarray:
        key = (str(path), pool, size)
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
                return hit
        arr = decode_pool(path, pool, size, max_seconds)
        with self.lock:
            self.decodes += 1
            if arr.nbytes <= self.max_bytes:
                self.items[key] = arr
                self.bytes += arr.nbytes
                while self.bytes > self.max_bytes:
                    _, old = self.items.popitem(last=False)
                    self.bytes -= old.nbytes
        return arr


class VideoTextDataset(torch.utils.data.Dataset):
    """Records of video paths → {pixel_values (T,3,S,S), frame_mask (T,), caption, captions,
    label, index}; None for a bad video. Clips shorter than T frames are padded (mask 0).

    Frames, the caption and the augmentation crop (one per clip, the same on every frame) draw
    from a Generator seeded by (seed, epoch, index): identical whichever worker makes the item.
    """

    def __init__(
        self,
        records,
        transform: ImageTransform,
        frames: int,
        seed: int = 0,
        train: bool = False,
        pool: int = 32,
        max_seconds: float = 600.0,
        cache: FrameCache | None = None,
    ):
        self.records, self.transform, self.frames, self.seed = records, transform, frames, seed
        self.train, self.pool, self.max_seconds = train, max(pool, frames), max_seconds
        self.cache = cache if cache is not None else FrameCache(0)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict | None:
        rec = self.records[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        try:
            pool = self.cache.get(rec.image, self.pool, self.transform.decode_size, self.max_seconds)
        except BadImage as e:
            log.warning("bad video at load time: %s", e)
            return None
        idx = sample_frames(len(pool), self.frames, rng if self.train else None)
        crop_seed = int(rng.integers(2**63))
        s = self.transform.size
        px = np.zeros((self.frames, 3, s, s), np.float32)
        for k, j in enumerate(idx):
            px[k] = self.transform(Image.fromarray(pool[j]), np.random.default_rng(crop_seed))
        mask = np.zeros(self.frames, bool)
        mask[: len(idx)] = True
        caption = rec.captions[int(rng.integers(len(rec.captions)))] if rec.captions else ""
        return {
            "pixel_values": px,
            "frame_mask": mask,
            "caption": caption,
            "captions": rec.captions,
            "label": -1 if rec.label is None else rec.label,
            "index": i,
        }


def clip_dataset(cfg, processor, records, train: bool, cache: FrameCache, max_seconds: float | None = None):
    """A task's VideoTextDataset from the run's config: `data.frames` of a pool of
    `data.frame_pool`, augmented in training (`data.augment`), refused beyond `max_seconds` (at
    most `data.max_video_seconds`)."""
    d = cfg.data
    limit = d.max_video_seconds if max_seconds is None else min(max_seconds, d.max_video_seconds)
    tf = processor.transform(augment=train and d.augment)
    return VideoTextDataset(records, tf, d.frames, cfg.seed, train, d.frame_pool, limit, cache)


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8, intra_only: bool = False) -> None:
    """(T, H, W, 3) uint8 frames → an MPEG-4 video file (H and W even), written atomically.

    `intra_only`: every frame a keyframe. Motion-compensated frames keep faint residue on the side
    the content came from, so one decoded frame can tell which way things move."""
    av = _av()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    with av.open(str(tmp), "w") as c:
        stream = c.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}  # best quality: colours of small shapes survive
        if intra_only:
            stream.codec_context.gop_size = 1
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    os.replace(tmp, path)


def sniff_msrvtt(path: str | Path) -> bool:
    """A .json of MSR-VTT captions: {"sentences": [{video_id, caption}…]} or [{video_id…}…]."""
    p = Path(path)
    if p.suffix.lower() != ".json" or not p.is_file():
        return False
    import json

    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if isinstance(data, dict):
        data = data.get("sentences")
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and "video_id" in data[0]


def _video_file(root: Path, video_id: str) -> str:
    """root/VIDEO_ID with the first video extension that exists (.mp4 when none: counted missing)."""
    if Path(video_id).suffix.lower() in VIDEO_EXTENSIONS:
        return str(root / video_id)
    for ext in sorted(VIDEO_EXTENSIONS):
        if (root / f"{video_id}{ext}").is_file():
            return str(root / f"{video_id}{ext}")
    return str(root / f"{video_id}.mp4")


def read_msrvtt(path: str | Path, video_root: str | Path | None = None):
    """MSR-VTT-style captions JSON → a Table of one record per video (its captions merged).

    Accepts {"sentences": [{"video_id", "caption"}…]} (the MSR-VTT release; `videos` may list
    the ids too) or a list of {"video_id", "caption" or "captions"}. Videos are found as
    `VIDEO_ID.<ext>` under `video_root` (default: the JSON's folder)."""
    import json

    from mmtune.data.formats import Record, Table
    from mmtune.errors import DataError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    rows = data.get("sentences") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise DataError(f"{path}: MSR-VTT JSON needs a 'sentences' list of {{video_id, caption}}")
    root = Path(video_root) if video_root else path.parent
    recs: dict[str, Record] = {}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "video_id" not in row:
            raise DataError(f"{path}: entry {n} needs a 'video_id'")
        vid = str(row["video_id"])
        rec = recs.setdefault(vid, Record(image=_video_file(root, vid), id=vid))
        caps = row.get("captions", row.get("caption", []))  # a list of captions, or one
        rec.captions.extend(str(c) for c in ([caps] if isinstance(caps, str) else caps))
    kept = [r for r in recs.values() if r.captions]
    skipped = {"no_caption": len(recs) - len(kept)} if len(kept) < len(recs) else {}
    if not kept:
        raise DataError(f"{path}: no video has a caption")
    return Table(kept, None, skipped)
