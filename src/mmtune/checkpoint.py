"""Atomic checkpoints: write into a temp folder, fsync, rename, mark complete; safe reading."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmtune.errors import CheckpointError

COMPLETE = "COMPLETE"
MAX_HEADER = 100 * 1024 * 1024


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
        raise CheckpointError(
            f"{path}: damaged safetensors header (declares {n} bytes, file {size})"
        )
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
        (tmp / COMPLETE).write_text("ok\n")
        _fsync_tree(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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
