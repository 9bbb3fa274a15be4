"""The Python API the CLI mirrors: load a model, build data, fit, evaluate."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import torch

from mmtune.config import Config, load_config, save_config
from mmtune.data import Splits, load_splits, screen
from mmtune.errors import CheckpointError, UserError
from mmtune.precision import effective_precision
from mmtune.tasks import Context, get_task

log = logging.getLogger("mmtune")


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic kernels."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def configure_threads() -> None:
    """Honour MMTUNE_THREADS (or leave torch's default)."""
    n = os.environ.get("MMTUNE_THREADS")
    if n:
        torch.set_num_threads(int(n))


def build_data(cfg: Config) -> Splits:
    """Read the splits and drop bad samples (counted in `splits.skipped`)."""
    splits = load_splits(cfg.data, cfg.seed)
    d = cfg.data
    for name in ("train", "val", "test"):
        records = splits.get(name)
        if not records:
            continue
        good, bad = screen(records, d.on_bad_sample, d.max_image_pixels, d.max_bad_fraction, name)
        setattr(splits, name, good)
        splits.skipped.update(bad)
    return splits


def fingerprint(records, cfg: Config) -> str:
    """Identifies the training data and batch geometry a checkpoint's data position refers to."""
    h = hashlib.sha256()
    for r in records:
        h.update(str(r.id).encode())
    h.update(f"{len(records)}/{cfg.data.batch_size}/{cfg.train.grad_accum}/{cfg.seed}".encode())
    return h.hexdigest()[:16]


def _context(cfg, processor, splits, device) -> Context:
    precision = effective_precision(cfg.train.precision, device.type)
    autocast = None
    if precision != "fp32":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16

        def autocast():
            return torch.autocast(device.type, dtype=dtype)

    return Context(cfg, processor, splits, device, autocast)


def _metric_summary(splits: Splits, task) -> dict:
    """data.skipped (by reason) and data.train/val/test: what each split holds, counted in the
    task's own units (`task.count`, e.g. images for captioning; records by default)."""
    skipped = Counter(splits.skipped)
    out = {"data.skipped": int(sum(skipped.values()))}
    out.update({f"data.skipped.{k}": int(v) for k, v in sorted(skipped.items())})
    count = getattr(task, "count", len)
    for name in ("train", "val", "test"):
        out[f"data.{name}"] = count(splits.get(name) or [])
    return out


def write_metrics(run_dir: Path, metrics: dict) -> None:
    from mmtune.engine import _finite_json

    (run_dir / "metrics.json").write_text(json.dumps(_finite_json(metrics), indent=2) + "\n")


def train(cfg: Config, resume: str | None = None, on_eval=None) -> dict:
    """Train as configured, evaluate on the test split, write the run folder; return metrics."""
    from mmtune.engine import close_process_group

    metrics = _train(cfg, resume, on_eval)
    close_process_group()  # after a run that ended normally, on every rank
    return metrics


def _train(cfg: Config, resume: str | None, on_eval=None) -> dict:
    from mmtune.engine import Trainer
    from mmtune.models import count_parameters, load_model, save_spec
    from mmtune.report import write_report

    configure_threads()
    set_seed(cfg.seed, cfg.train.deterministic)
    run_dir = cfg.run_dir
    resume_dir = _resume_target(run_dir, resume)
    if resume_dir is None and (run_dir / "metrics.jsonl").exists():
        raise UserError(f"{run_dir} already holds a run: pick another name= or pass --resume")
    task_cls = get_task(cfg.task)
    splits = build_data(cfg)
    # a task that builds its own kind of model (not a dual encoder) loads it itself
    loader = getattr(task_cls, "load_model", None)
    model, processor = loader(cfg) if loader else load_model(cfg.model)
    if cfg.train.loss == "siglip" and model.logit_bias is None:
        if not hasattr(model, "add_logit_bias"):
            raise UserError(
                f"train.loss=siglip needs a logit bias, which {cfg.model.name} lacks: use a SigLIP "
                "checkpoint, a preset or a composed model"
            )
        model.add_logit_bias()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    from mmtune.checkpoint import clean_stale

    clean_stale(run_dir / "checkpoints")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = task_cls(_context(cfg, processor, splits, device))
    model = task.build_head(model)
    trainable, total = count_parameters(model)  # the model the task trains, heads included
    print(f"parameters: {trainable:,} trainable / {total:,} total", flush=True)
    if not (run_dir / "model").exists():
        save_spec(model, processor, run_dir / "model")
    trainer = Trainer(
        cfg, task, model, splits.train, splits.val, run_dir, fingerprint(splits.train, cfg)
    )
    task.ctx.device = trainer.acc.device
    trainer.on_eval = on_eval  # on_eval(step, val_metrics); raising engine.Pruned ends the run
    if resume_dir is not None:
        trainer.resume(resume_dir)
    state = trainer.fit()
    if not trainer.acc.is_main_process:
        return {}
    if state.step < trainer.total_steps:
        print(
            f"stopped after step {state.step} of {trainer.total_steps}; continue with --resume auto"
        )
        return {"train.steps": state.step}
    best = run_dir / "checkpoints" / "best"
    if cfg.train.eval_every and best.exists():
        from mmtune.models.load import load_weights

        load_weights(trainer.acc.unwrap_model(trainer.model), best / "model.safetensors")
    final_split = cfg.eval.split if splits.get(cfg.eval.split) else "val"
    metrics = trainer.evaluate(splits.get(final_split))
    metrics.update(_metric_summary(splits, task))
    metrics.update({
        "eval.split": final_split,
        "train.steps": state.step,
        "train.seconds": round(state.train_seconds, 3),
        "train.samples_per_s": round(state.samples / max(state.train_seconds, 1e-9), 2),
        "train.skipped_steps": state.skipped_steps,
        "model.trainable_params": trainable,
        "model.total_params": total,
    })  # fmt: skip
    write_metrics(run_dir, metrics)
    write_report(run_dir)
    return metrics


def _resume_target(run_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    from mmtune import checkpoint as ckpt

    if resume == "auto":  # the newest intact checkpoint (a damaged one is passed over), or fresh
        return ckpt.latest(run_dir / "checkpoints")
    p = Path(resume)
    if (p / "checkpoints" / "last").exists():
        p = p / "checkpoints" / "last"
    if not (p / "COMPLETE").exists():
        raise CheckpointError(f"no valid checkpoint at {resume}")
    return ckpt.verify(p)


def _load_for_eval(checkpoint: Path, cfg: Config, splits: Splits, device):
    """A run's model as its task trained it: a classifier run rebuilds its head (and LoRA)."""
    from mmtune.models import load_run, resolve_checkpoint
    from mmtune.models.load import _read_spec

    spec_dir, _ = resolve_checkpoint(checkpoint)
    if "classify" in _read_spec(spec_dir):
        from mmtune.classify.model import load_classifier

        ctx = _context(cfg, None, splits, device)
        model, processor, _ = load_classifier(checkpoint, ctx)
        return model, processor
    return load_run(checkpoint)


def evaluate(checkpoint: str | Path, cfg: Config | None = None, split: str | None = None) -> dict:
    """Evaluate a run (or checkpoint folder) on a split of the configured data."""
    checkpoint = Path(checkpoint)
    if cfg is None:
        saved = checkpoint / "config.yaml"
        cfg = load_config(saved if saved.is_file() else None)
    configure_threads()
    splits = build_data(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = _load_for_eval(checkpoint, cfg, splits, device)
    model.to(device)
    task = get_task(cfg.task)(_context(cfg, processor, splits, device))
    split = split or cfg.eval.split
    records = splits.get(split) or splits.val
    start = time.perf_counter()
    metrics = task.evaluate(model, records)
    metrics.update(_metric_summary(splits, task))
    metrics["eval.seconds"] = round(time.perf_counter() - start, 3)
    return metrics
