"""Weight-space interpolation of two checkpoints of one architecture (WiSE-FT):
θ(α) = (1 − α)·θ_A + α·θ_B, written as a checkpoint that loads like a trained run.

`mmtune interpolate A B --alpha 0.5 --output OUT` works for any two mmtune runs or checkpoint
folders with the same parameter names and shapes — classifiers and contrastive fine-tunes alike
(e.g. a zero-shot model and its fine-tune, to win back zero-shot quality the fine-tune lost).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mmtune.errors import CheckpointError, UserError


def interpolate_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 − α)·a + α·b for every floating tensor; other tensors (counters, ids) must be equal.

    Computed in float32 at least and cast back to a's dtype; CheckpointError when the names or
    shapes differ, so two architectures are never blended silently.
    """
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise CheckpointError(
            f"checkpoints have different architectures: only in the first {only_a[:3]}, only in the second {only_b[:3]}"
        )
    out = {}
    for k, ta in a.items():
        tb = b[k]
        if ta.shape != tb.shape:
            raise CheckpointError(f"'{k}' has shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
        if ta.is_floating_point():
            dtype = torch.promote_types(ta.dtype, torch.float32)
            mix = (1.0 - alpha) * ta.to(dtype) + alpha * tb.to(dtype)
            out[k] = mix.to(ta.dtype)
        elif torch.equal(ta, tb):
            out[k] = ta.clone()
        else:
            raise CheckpointError(f"'{k}' is not floating point and differs between checkpoints")
    return out


class _Weights:
    """A state dict that checkpoint.save_checkpoint can save like a module."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def write_interpolated(a: str | Path, b: str | Path, alpha: float, output: str | Path) -> Path:
    """Interpolate runs/checkpoints `a` and `b` at `alpha`; write a run folder at `output`.

    `output` gets `model/` (a's architecture spec), `checkpoints/best/` and a.config.yaml when a
    has one, so `mmtune eval --checkpoint OUTPUT` and `load_run` read it as a trained run.
    """
    from mmtune.checkpoint import read_safetensors, save_checkpoint
    from mmtune.runs import resolve_checkpoint

    spec_a, ckpt_a = resolve_checkpoint(a)
    _, ckpt_b = resolve_checkpoint(b)
    state = interpolate_state(
        read_safetensors(ckpt_a / "model.safetensors"),
        read_safetensors(ckpt_b / "model.safetensors"),
        alpha,
    )
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(spec_a, out / "model", dirs_exist_ok=True)
    run_a = spec_a.parent if spec_a.name == "model" else spec_a
    if (run_a / "config.yaml").is_file():
        shutil.copy(run_a / "config.yaml", out / "config.yaml")
    meta = {"interpolated": {"a": str(a), "b": str(b), "alpha": alpha}}
    save_checkpoint(out / "checkpoints" / "best", _Weights(state), meta=meta)
    return out
