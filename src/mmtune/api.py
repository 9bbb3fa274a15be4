"""The Python API the CLI mirrors: load a model, build data, fit, evaluate."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from mmtune.config import Config, save_config
from mmtune.data import Splits, load_splits, screen
from mmtune.data.wds import shard_signature
from mmtune.errors import CheckpointError, DataError, UserError
from mmtune.tasks import Context, Evaluation, get_task

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
        good, bad = screen(
            records,
            d.on_bad_sample,
            d.max_image_pixels,
            d.max_bad_fraction,
            name,
            max_video_seconds=d.max_video_seconds,
        )
        setattr(splits, name, good)
        splits.skipped.update(bad)
    return splits


def fingerprint(records, cfg: Config) -> str:
    """Identifies the training data and batch geometry a checkpoint's data position refers to:
    the records, or with `data.shards` the shard list (names and sizes, in reading order)."""
    h = hashlib.sha256()
    for r in records:
        h.update(str(r.id).encode())
    h.update(f"{len(records)}/{cfg.data.batch_size}/{cfg.train.grad_accum}/{cfg.seed}".encode())
    if cfg.data.shards:
        h.update(json.dumps(shard_signature(cfg.data.shards)).encode())
    return h.hexdigest()[:16]


def _metric_summary(splits: Splits, task) -> dict:
    """data.skipped (by reason) and data.train/val/test: what each split holds, counted in the
    task's own units (`task.count`, e.g. images for captioning; records by default)."""
    skipped = Counter(splits.skipped)
    out = {"data.skipped": int(sum(skipped.values()))}
    out.update({f"data.skipped.{k}": int(v) for k, v in sorted(skipped.items())})
    for name in ("train", "val", "test"):
        out[f"data.{name}"] = task.count(splits.get(name) or [])
    return out


def write_artifacts(run_dir: Path, evaluation: Evaluation) -> None:
    """A task's tables (tables/NAME.json), images (plots/NAME.png) and examples
    (examples/NAME.json, thumbnails examples/NAME/NN.png) in the run folder."""
    if evaluation.tables:
        (run_dir / "tables").mkdir(parents=True, exist_ok=True)
    for name, table in evaluation.tables.items():
        (run_dir / "tables" / f"{name}.json").write_text(json.dumps(table, indent=1) + "\n")
    if evaluation.images:
        (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    for name, image in evaluation.images.items():
        image.save(run_dir / "plots" / f"{name}.png")
    for name, ex in evaluation.examples.items():
        folder = run_dir / "examples" / name
        shutil.rmtree(folder, ignore_errors=True)  # thumbnails of an earlier evaluation
        folder.mkdir(parents=True)
        files = []
        for i, image in enumerate(ex.images):
            image.save(folder / f"{i:02d}.png")
            files.append(f"examples/{name}/{i:02d}.png")
        rows = [[*row, f] for row, f in zip(ex.rows, files, strict=True)]
        spec = {"title": ex.title, "columns": [*ex.columns, "image"], "rows": rows}
        (run_dir / "examples" / f"{name}.json").write_text(json.dumps(spec, indent=1) + "\n")


def write_metrics(run_dir: Path, metrics: dict) -> None:
    from mmtune.engine import finite_json

    (run_dir / "metrics.json").write_text(json.dumps(finite_json(metrics), indent=2) + "\n")


def train(cfg: Config, resume: str | None = None, on_eval=None) -> dict:
    """Train as configured, evaluate on the test split, write the run folder; return metrics."""
    from mmtune.engine import close_process_group
    from mmtune.runs import removed_on_failure

    with removed_on_failure(cfg.run_dir):  # a run that fails before any result leaves no folder
        metrics = _train(cfg, resume, on_eval)
    close_process_group()  # after a run that ended normally, on every rank
    return metrics


def _train(cfg: Config, resume: str | None, on_eval=None) -> dict:
    from mmtune.engine import Trainer, make_accelerator
    from mmtune.models import count_parameters
    from mmtune.report import write_report
    from mmtune.runs import record_task

    configure_threads()
    set_seed(cfg.seed, cfg.train.deterministic)
    run_dir = cfg.run_dir
    resume_dir = _resume_target(run_dir, resume)
    if resume_dir is None and (run_dir / "metrics.jsonl").exists():
        raise UserError(f"{run_dir} already holds a run: pick another name= or pass --resume")
    task_cls = get_task(cfg.task)
    splits = build_data(cfg)
    acc = make_accelerator(cfg, run_dir)
    final_split = final_eval_split(cfg, splits, say=acc.is_main_process)
    task = task_cls(Context(cfg, splits, acc.device))
    model = task.build()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    from mmtune.checkpoint import clean_stale

    clean_stale(run_dir / "checkpoints")
    trainable, total = count_parameters(model)  # the model the task trains, heads included
    print(f"parameters: {trainable:,} trainable / {total:,} total", flush=True)
    if acc.is_main_process:
        task.save(model, run_dir / "model")
        record_task(run_dir / "model", task.name)
    data = (splits.train, splits.val)
    trainer = Trainer(cfg, task, model, acc, data, run_dir, fingerprint(splits.train, cfg))
    trainer.on_eval = on_eval  # on_eval(step, val_metrics); raising engine.Pruned ends the run
    if resume_dir is not None:
        trainer.resume(resume_dir)
    state = trainer.fit()
    streamed = trainer.stream_skipped() if cfg.data.shards else None  # every rank takes part
    if not acc.is_main_process:
        return {}
    if state.step < trainer.total_steps and not state.stopped_early:
        print(f"stopped after step {state.step} of {trainer.total_steps}; continue with --resume auto")
        return {"train.steps": state.step}
    best = run_dir / "checkpoints" / "best"
    if cfg.train.eval_every and best.exists():
        task.load_weights(model, best / "model.safetensors")
    metrics = {}
    if final_split is not None:
        evaluation = trainer.evaluate(splits.get(final_split))
        write_artifacts(run_dir, evaluation)
        metrics = dict(evaluation.metrics)
    metrics.update(_metric_summary(splits, task))
    if streamed is not None:  # skips while streaming: a bad sample met in several epochs counts each time
        metrics["data.shards.skipped"] = int(sum(streamed.values()))
        metrics.update({f"data.shards.skipped.{k}": int(v) for k, v in streamed.items()})
    metrics.update(
        {
            "eval.split": final_split,
            "train.steps": state.step,
            "train.seconds": round(state.train_seconds, 3),
            "train.samples_per_s": round(state.samples / max(state.train_seconds, 1e-9), 2),
            "train.skipped_steps": state.skipped_steps,
            **({"train.stopped_early": state.stopped_early} if cfg.train.early_stopping else {}),
            "model.trainable_params": trainable,
            "model.total_params": total,
        }
    )
    write_metrics(run_dir, metrics)
    write_report(run_dir)
    return metrics


TINY_EVAL = 20  # an evaluated split smaller than this gives figures that mean little


def final_eval_split(cfg: Config, splits: Splits, say: bool = True, wanted: str | None = None) -> str | None:
    """The split the figures come from: `wanted` (default `eval.split`); test falls back to val (never
    val to test: a search on val must not see test); None when there is no data for it. Said in one
    warning line when it is not the split asked for, or is tiny."""
    wanted = wanted or cfg.eval.split
    split = wanted if splits.get(wanted) else ("val" if wanted == "test" and splits.val else None)
    if not say:
        return split
    if split is None and splits.test:
        log.warning("no validation data: eval.split=val has no figures (the test split never stands in for it)")
    elif split is None:
        log.warning(
            "no validation or test data (data.val_fraction=%s, no data.val, no data.test): "
            "no figures are computed and checkpoints/last/ is the final model",
            cfg.data.val_fraction,
        )
    elif split != wanted:
        picked = ", which also picked checkpoints/best/" if cfg.train.eval_every else ""
        log.warning(
            "no data.test: the final figures are on the validation split (%d samples)%s", len(splits.val), picked
        )
    n = len(splits.get(split)) if split else 0
    if 0 < n < TINY_EVAL:
        log.warning("the final figures are on %d %s samples: they mean little", n, split)
    if split != "val" and cfg.train.eval_every and 0 < len(splits.val) < TINY_EVAL:
        log.warning("checkpoints/best/ is picked on %d validation samples: a choice that means little", len(splits.val))
    return split


def _resume_target(run_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    from mmtune import checkpoint as ckpt

    if resume == "auto":  # the newest intact checkpoint (a damaged one is passed over), or fresh
        found = ckpt.latest(run_dir / "checkpoints")
        if found is None:
            if (run_dir / "metrics.jsonl").exists():
                raise CheckpointError(
                    f"{run_dir} holds a run with no intact checkpoint to resume: pick another name= or remove it"
                )
            print(f"no checkpoint under {run_dir / 'checkpoints'}: starting from scratch", flush=True)
        return found
    p = Path(resume)
    if (p / "checkpoints" / "last").exists():
        p = p / "checkpoints" / "last"
    if not (p / "COMPLETE").exists():
        raise CheckpointError(f"no valid checkpoint at {resume}")
    return ckpt.verify(p)


def evaluate(
    checkpoint: str | Path, cfg: Config | None = None, split: str | None = None, artifacts: str | Path | None = None
) -> dict:
    """Evaluate a run (or checkpoint folder) on a split of the configured data; the evaluation's
    tables and plots go into `artifacts` (`tables/`, `plots/`) when given."""
    from mmtune.runs import open_run, resolve_checkpoint, run_config

    checkpoint = Path(checkpoint)
    cfg = cfg or run_config(resolve_checkpoint(checkpoint)[0])
    configure_threads()
    splits = build_data(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task, model = open_run(checkpoint, cfg, splits, device)
    wanted = split or cfg.eval.split
    if not (splits.val if wanted == "val" else splits.val or splits.test):
        raise DataError(
            f"{splits.name}: no {'validation' if wanted == 'val' else 'validation or test'} records to evaluate"
        )
    split = final_eval_split(cfg, splits, wanted=wanted)
    start = time.perf_counter()
    with torch.no_grad():
        evaluation = task.evaluate(model, splits.get(split))
    if artifacts is not None:
        write_artifacts(Path(artifacts), evaluation)
    metrics = dict(evaluation.metrics)
    metrics.update(_metric_summary(splits, task))
    metrics["eval.split"] = split
    metrics["eval.seconds"] = round(time.perf_counter() - start, 3)
    return metrics
