"""Atomic checkpoints: write into a temp folder, fsync, rename, mark complete; safe reading."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmtune.errors import CheckpointError

COMPLETE = "COMPLETE"
MAX_HEADER = 100 * 1024 * 1024
log = logging.getLogger("mmtune.checkpoint")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking its header fits the file (no huge allocation)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{path}: damaged safetensors header (declares {n} bytes, file {size})")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad offsets
        raise CheckpointError(f"{path}: cannot read weights ({e})") from None


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_dict_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tensors shared under two names are stored once per name."""
    out, seen = {}, set()
    for k, v in module.state_dict().items():
        t = v.detach().cpu()
        if t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        out[k] = t.contiguous()
    return out


def save_checkpoint(
    target: str | Path,
    model: torch.nn.Module,
    trainer_state: dict | None = None,
    meta: dict | None = None,
) -> Path:
    """Write weights (safetensors), trainer state (torch, tensors only) and meta JSON atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(state_dict_for_save(model), str(tmp / "model.safetensors"))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2))
        _write_marker(tmp)
        _fsync_tree(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_marker(folder: Path) -> None:
    """The completion marker, written last: it lists every file with its size (see `verify`)."""
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / COMPLETE).write_text(json.dumps({"files": sizes}, indent=1) + "\n")


def verify(folder: str | Path) -> Path:
    """`folder` if it is a complete checkpoint whose files all have their written sizes.

    CheckpointError naming the folder (no marker) or the file (missing, truncated, grown).
    Markers of older checkpoints (no file list) only prove completion.
    """
    folder = Path(folder)
    marker = folder / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"no valid checkpoint at {folder} (no {COMPLETE} marker)")
    try:
        files = json.loads(marker.read_text()).get("files", {})
    except (json.JSONDecodeError, AttributeError):
        files = {}
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"{path}: damaged ({actual} bytes on disk, {size} written)" + (" — truncated" if actual < size else "")
            )
    return folder


def latest(ckpt_root: str | Path, names: tuple[str, ...] = ("last", "best")) -> Path | None:
    """The newest (by step) checkpoint under `ckpt_root` that `verify` accepts, or None if none
    was ever completed. A damaged newer one is passed over with a warning naming its file."""
    root = Path(ckpt_root)
    found = [root / n for n in names if is_complete(root / n)]
    found += [p for p in sorted(root.glob(f"{STEP_PREFIX}*")) if is_complete(p)]  # keep-last-N
    if not found:
        return None

    found.sort(key=_step_of, reverse=True)  # stable: `last` before `best` at the same step
    problems = []
    for folder in found:
        try:
            verify(folder)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            log.warning("%s; falling back to %s", "; ".join(problems), folder)
        return folder
    raise CheckpointError("no valid checkpoint to resume: " + "; ".join(problems))


STEP_PREFIX = "step-"


def _step_of(folder: Path) -> int:
    try:
        return int(read_meta(folder).get("state", {}).get("step", -1))
    except CheckpointError:
        return -1


def retire_last(ckpt_root: str | Path, step: int) -> None:
    """Keep-last-N, before a new `last` at `step` is written: the current `last` (if complete and
    older) becomes `step-NNNNNNNN` by a rename — no copy, and no moment without a checkpoint."""
    last = Path(ckpt_root) / "last"
    if not is_complete(last) or (old := _step_of(last)) >= step:
        return
    target = last.parent / f"{STEP_PREFIX}{old:08d}"
    if target.exists():
        shutil.rmtree(target)
    last.rename(target)


def prune_steps(ckpt_root: str | Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest `step-*` checkpoints; returns the deleted folders."""
    steps = sorted(Path(ckpt_root).glob(f"{STEP_PREFIX}*"), key=lambda p: p.name)
    doomed = steps[: max(0, len(steps) - keep)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def _swap_in(tmp: Path, target: Path) -> None:
    trash = target.parent / f".trash-{target.name}"
    if target.exists():
        if trash.exists():
            shutil.rmtree(trash)
        target.rename(trash)  # the old copy stays recoverable until the new one is in place
    tmp.rename(target)
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(ckpt_root: str | Path) -> None:
    """Remove temp folders of crashed saves; restore a checkpoint left mid-swap."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for trash in root.glob(".trash-*"):
        target = root / trash.name[len(".trash-") :]
        if not target.exists() and (trash / COMPLETE).exists():
            trash.rename(target)
        else:
            shutil.rmtree(trash, ignore_errors=True)


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE).is_file()


def read_meta(folder: str | Path) -> dict:
    try:
        return json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: unreadable meta.json ({e})") from None


def load_trainer_state(folder: str | Path) -> dict:
    """Optimizer/scheduler/RNG state, loaded with weights_only=True (no pickled code runs)."""
    path = Path(folder) / "trainer_state.pt"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no trainer_state.pt to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be loaded safely ({e.__class__.__name__})") from None


def copy_checkpoint(src: str | Path, target: str | Path) -> Path:
    """Atomically replace `target` with a copy of the complete checkpoint `src`."""
    src, target = Path(src), Path(target)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    _fsync_tree(tmp)
    _swap_in(tmp, target)
    return target
