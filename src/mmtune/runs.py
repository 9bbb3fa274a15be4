"""Run folders: where a run's model and checkpoints are, which task made it, and reloading it.

A run folder holds `config.yaml` (whose `task` names the task that owns the model), `model/`
(what the task's `save` wrote, with the task's name in `mmtune_model.json`) and
`checkpoints/{last,best,step-N}/`. Every command that uses a trained model (`eval`, `predict`,
`serve`, `export`, `generate`, fine-tuning from a run) comes through `open_run`, which asks the
run's task to rebuild the model — no command tests what kind of model it holds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from mmtune.errors import CheckpointError

SPEC_FILE = "mmtune_model.json"
log = logging.getLogger("mmtune")


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(spec folder, checkpoint folder) for a run folder (best, else last) or a checkpoint folder."""
    from mmtune.checkpoint import is_complete

    p = Path(path)
    if (p / SPEC_FILE).is_file() and (p / "model.safetensors").is_file():
        return p, p  # an exported / self-contained model folder
    if (p / "model" / SPEC_FILE).is_file():
        for name in ("best", "last"):
            if is_complete(p / "checkpoints" / name):
                return p / "model", p / "checkpoints" / name
        raise CheckpointError(f"no valid checkpoint in {p / 'checkpoints'}")
    if is_complete(p) and (p.parent.parent / "model" / SPEC_FILE).is_file():
        return p.parent.parent / "model", p
    raise CheckpointError(f"no valid checkpoint at {p}")


def read_spec(folder: Path) -> dict:
    """A model folder's `mmtune_model.json`."""
    f = Path(folder) / SPEC_FILE
    if not f.is_file():
        raise CheckpointError(f"{folder}: not an mmtune model folder ({SPEC_FILE} missing)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: corrupt ({e.msg})") from None


def record_task(folder: Path, task: str) -> None:
    """Name the task that owns the model in its spec (what `open_run` reads)."""
    spec = read_spec(folder)
    spec["task"] = task
    (Path(folder) / SPEC_FILE).write_text(json.dumps(spec, indent=2))


def run_config(spec_dir: Path, overrides: dict | None = None):
    """The config of the run a model folder belongs to (its `config.yaml`, else the defaults of
    the task its spec names), with dotted `overrides` applied."""
    from mmtune.config import load_config

    for cand in (spec_dir.parent / "config.yaml", spec_dir / "config.yaml"):
        if cand.is_file():
            return load_config(cand, overrides, saved_run=True)
    spec = read_spec(spec_dir)
    task = spec.get("task")
    if task is None:  # a model folder written before runs named their task, or by save_spec alone
        from mmtune.tasks import infer_legacy_task

        task = infer_legacy_task(spec)
        log.info("%s does not name its task: read as %s (`mmtune runs upgrade` records it)", spec_dir, task)
    return load_config(None, {"task": task, **(overrides or {})})


def open_run(path: str | Path, cfg=None, splits=None, device=None):
    """(task, model) of a run / checkpoint / exported folder: the task rebuilds the model (its
    processor in `task.processor`), the checkpoint's weights are loaded, the model is in eval
    mode on `device`. `cfg` (default: the run's) decides the data and options of the task."""
    from mmtune.tasks import Context, get_task

    spec_dir, ckpt = resolve_checkpoint(path)
    saved = run_config(spec_dir)
    cfg = cfg or saved
    if cfg.task != saved.task:
        raise CheckpointError(f"{path} was trained by task {saved.task}, not {cfg.task}")
    device = device or torch.device("cpu")
    task = get_task(cfg.task)(Context(cfg, splits, device))
    model = task.load(spec_dir)
    task.load_weights(model, ckpt / "model.safetensors")
    return task, model.to(device).eval()


def load_run(path: str | Path):
    """(model, processor) from a run folder or one of its checkpoints, weights loaded."""
    task, model = open_run(path)
    return model, task.processor


def upgrade(path: str | Path) -> str:
    """Record the task in a model folder written before runs named it; returns the task."""
    from mmtune.tasks import infer_legacy_task

    spec_dir, _ = resolve_checkpoint(path)
    spec = read_spec(spec_dir)
    if "task" in spec:
        return spec["task"]
    cfg_file = spec_dir.parent / "config.yaml"
    if cfg_file.is_file():
        from mmtune.config import load_config, save_config

        cfg = load_config(cfg_file, saved_run=True)
        save_config(cfg, cfg_file)  # in today's keys
        task = cfg.task
    else:
        task = infer_legacy_task(spec)
    record_task(spec_dir, task)
    return task


def holds_results(folder: str | Path) -> bool:
    """Whether a run folder holds something worth keeping: a complete checkpoint, a training log
    or final figures (at any depth: `mmtune classify` keeps one run folder per method)."""
    folder = Path(folder)
    return any(next(folder.rglob(name), None) for name in ("COMPLETE", "metrics.jsonl", "metrics.json"))


@contextmanager
def removed_on_failure(run_dir: str | Path):
    """Run the body; when it fails, remove `run_dir` if the body created it and it holds no results
    (`holds_results`), so a failed command leaves no empty run folder behind. Rank 0 only."""
    run_dir = Path(run_dir)
    existed = run_dir.exists()
    try:
        yield run_dir
    except BaseException:
        rank0 = os.environ.get("RANK", "0") == "0"
        if rank0 and not existed and run_dir.is_dir() and not holds_results(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            log.info("removed %s: the command failed before writing results", run_dir)
        raise
