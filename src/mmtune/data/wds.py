"""Where WebDataset shards are and how many samples each holds, without an mmtune index.

A shard source is a folder of `.tar` files, or a brace pattern as WebDataset and img2dataset
write them (`shards/{00000..00099}.tar`, `data/{train,extra}-{0..9}.tar`). Sample counts come
from, in order: mmtune's `index.json`, img2dataset's `NNNNN_stats.json` beside each shard
(`successes`), or one pass over the tar headers, cached in `.mmtune-counts.json` beside the data
(keyed by size and mtime, so a rewritten shard is counted again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from mmtune.errors import DataError

log = logging.getLogger("mmtune.data")
COUNTS_FILE = ".mmtune-counts.json"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


@dataclass(frozen=True)
class Shard:
    """One tar file of a source and its number of samples."""

    path: Path
    samples: int


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern denotes, in order: `{000..002}` ranges and `{a,b}` lists."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    r = _RANGE.fullmatch(body)
    if r:
        lo, hi = r.groups()
        # zero-padded bounds keep their width, as in bash and WebDataset
        width = max(len(lo), len(hi)) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return [x for item in items for x in expand_braces(head + item + tail)]


def is_shard_source(spec: str | Path) -> bool:
    """A brace pattern, a .tar file, or a folder holding .tar files."""
    p = Path(spec)
    if "{" in str(spec) or p.suffix == ".tar":
        return True
    return p.is_dir() and any(p.glob("*.tar"))


def shard_paths(spec: str | Path) -> list[Path]:
    """The tar files of a source; DataError naming the pattern or the first missing file."""
    text = str(spec)
    if re.match(r"^[a-z][a-z0-9+]*:", text) and not Path(text).exists():
        raise DataError(f"{text}: only local shard files are read (no URLs or pipes)")
    if "{" in text:
        paths = [Path(p) for p in expand_braces(text)]
        missing = [p for p in paths if not p.is_file()]
        if len(missing) == len(paths):
            raise DataError(f"shard pattern {text} matches no file")
        if missing:
            raise DataError(f"shard pattern {text}: {len(missing)} of {len(paths)} files missing (first: {missing[0]})")
        return paths
    p = Path(text)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"shard source {text} does not exist")
    if (p / "nshards.txt").is_file():  # a CLIP_benchmark split: exactly 0.tar … N-1.tar
        try:
            n = int((p / "nshards.txt").read_text().strip())
        except ValueError:
            raise DataError(f"{p / 'nshards.txt'}: not a number of shards") from None
        return shard_paths(f"{p}/{{0..{n - 1}}}.tar")
    paths = sorted(p.glob("*.tar"), key=_natural)
    if not paths:
        raise DataError(f"{text}: no .tar shards in the folder")
    return paths


def _natural(path: Path) -> list:
    """Sort key putting 2.tar before 10.tar."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def classnames(spec: str | Path) -> list[str] | None:
    """Class names of a source: `classnames.txt` beside the shards or one folder up (CLIP_benchmark)."""
    folder = Path(spec) if Path(spec).is_dir() else Path(expand_braces(str(spec))[0]).parent
    for f in (folder / "classnames.txt", folder.parent / "classnames.txt"):
        if f.is_file():
            return [c for c in f.read_text(encoding="utf-8").splitlines() if c.strip()]
    return None


def count_samples(path: Path) -> int:
    """Samples in one tar (consecutive members sharing a key), read from the headers only.

    A truncated or corrupt tar counts the samples before the damage (reading reports it)."""
    n, last = 0, None
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if member.isfile():
                    key = sample_key(member.name)[0]
                    n, last = (n + 1, key) if key != last else (n, last)
    except (tarfile.TarError, EOFError, OSError) as e:
        # a cut-off download still serves the samples before the cut; reading counts the loss
        log.warning("%s: unreadable after %d samples (%s)", path, n, e)
    return n


def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member as WebDataset groups them: `dir/KEY.ext.more` → KEY."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def _stats_count(path: Path) -> int | None:
    stats = path.with_name(path.stem + "_stats.json")  # img2dataset: 00000.tar → 00000_stats.json
    if not stats.is_file():
        return None
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (ValueError, KeyError, TypeError, OSError):
        log.warning("%s: unreadable, counting the shard instead", stats)
        return None


def _cached_counts(paths: list[Path]) -> list[int]:
    """Counts from img2dataset stats or the cache; the rest counted and cached where writable."""
    cache_files = {p.parent / COUNTS_FILE for p in paths}
    cache: dict = {}
    for f in cache_files:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # absent or damaged
            cache.update({str(f.parent / k): v for k, v in json.loads(f.read_text()).items()})
    counts, fresh = [], {}
    for p in paths:
        st = p.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        hit = cache.get(str(p))
        if hit and hit[:2] == stamp:
            counts.append(hit[2])
            continue
        n = _stats_count(p)
        n = count_samples(p) if n is None else n
        fresh[str(p)] = [*stamp, n]
        counts.append(n)
    if fresh:
        _write_cache(fresh, cache)
    return counts


def _write_cache(fresh: dict, cache: dict) -> None:
    merged = {**cache, **fresh}
    for folder in {Path(k).parent for k in fresh}:
        entries = {Path(k).name: v for k, v in merged.items() if Path(k).parent == folder}
        tmp = folder / f"{COUNTS_FILE}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, folder / COUNTS_FILE)
        except OSError as e:  # read-only data: count again next time
            log.info("cannot cache shard counts in %s (%s)", folder, e.strerror)


def shard_signature(spec: str | Path) -> list[list]:
    """[[file name, size in bytes], …] of a source's tars in reading order: what a checkpoint's
    data position refers to (names and sizes, so the same shards copied elsewhere still match)."""
    return [[p.name, p.stat().st_size] for p in shard_paths(spec)]


# ---------------------------------------------------------------- members by reference

_MEMBERS: dict[str, tuple[tuple[int, int], dict[str, tuple[int, int]]]] = {}


def shard_member(ref: str | Path) -> tuple[str, str] | None:
    """(tar path, member name) when `ref` is `SHARD.tar#MEMBER` of an existing tar, else None."""
    tar_path, sep, member = str(ref).rpartition("#")
    if not sep or not tar_path.endswith(".tar") or not os.path.isfile(tar_path):
        return None
    return tar_path, member


def _member_offsets(tar_path: str) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of a tar, read from its headers once per version."""
    st = os.stat(tar_path)
    stamp = (st.st_size, st.st_mtime_ns)
    cached = _MEMBERS.get(tar_path)
    if cached is None or cached[0] != stamp:
        offsets = {}
        with contextlib.suppress(tarfile.TarError, EOFError, OSError), tarfile.open(tar_path, "r") as tar:
            for m in tar:  # a damaged tar serves the members before the damage
                if m.isfile():
                    offsets[m.name] = (m.offset_data, m.size)
        _MEMBERS[tar_path] = cached = (stamp, offsets)
    return cached[1]


def read_member(tar_path: str, member: str) -> bytes | None:
    """The bytes of one tar member (None when the tar lacks it), by offset: no handle is kept
    open, so loader workers and threads share nothing."""
    where = _member_offsets(tar_path).get(member)
    if where is None:
        return None
    offset, size = where
    with open(tar_path, "rb") as f:
        f.seek(offset)
        return f.read(size)  # short when the file was cut off: decoding reports it truncated


def resolve(spec: str | Path) -> tuple[list[Shard], list[str] | None]:
    """(shards with sample counts, class names if the source records them) of a shard source."""
    from mmtune.data.shards import INDEX, read_index

    if Path(spec).is_dir() and (Path(spec) / INDEX).is_file():
        index = read_index(spec)
        shards = [Shard(Path(spec) / s["name"], s["samples"]) for s in index["shards"]]
        return shards, index.get("classes")
    paths = shard_paths(spec)
    counts = _cached_counts(paths)
    return [Shard(p, n) for p, n in zip(paths, counts, strict=True)], classnames(spec)
