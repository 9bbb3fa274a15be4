"""Zero-shot benchmarks for any model, without training: `mmtune eval --benchmark` and `--suite`.

A benchmark is a CLIP_benchmark folder (`classnames.txt`, `zeroshot_classification_templates.txt`,
`SPLIT/nshards.txt` + `N.tar`), a built-in dataset (its split) or any data path mmtune reads (read
whole: an ImageFolder, a pairs file, a caption folder, COCO JSON). A model is anything `model.name`
takes: a preset, a hub id, a transformers or open_clip folder, an mmtune run. Results come in
CLIP_benchmark's layout — `{"dataset", "model", "pretrained", "task", "metrics", "language"}` with
its metric names (`acc1`, `acc5`, `mean_per_class_recall`, `image_retrieval_recall@K`,
`text_retrieval_recall@K`) — beside mmtune's own (`zeroshot.top1`, `retrieval.t2i.R@5`, …).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from mmtune.data import Splits, load_splits, screen
from mmtune.errors import ConfigError, DataError, UserError

CLASSIFICATION, RETRIEVAL, LINEAR_PROBE = "zeroshot_classification", "zeroshot_retrieval", "linear_probe"
TASKS = ("auto", CLASSIFICATION, RETRIEVAL, LINEAR_PROBE)
# the table's metrics per task; those no model reports (acc1 of a multi-label benchmark) are left out
TABLE_METRICS = {
    CLASSIFICATION: ("acc1", "acc5", "mean_per_class_recall", "mean_average_precision"),
    RETRIEVAL: ("image_retrieval_recall@5", "text_retrieval_recall@5"),
    LINEAR_PROBE: ("acc1", "acc5", "mean_per_class_recall"),
}
# the share of train held out to choose the probe's regularisation when a benchmark has no val split
VAL_PROPORTION = 0.2
# the task that owns zero-shot classification and retrieval evaluation of a dual encoder
EVAL_TASK = "contrastive"
_ZEROSHOT = {
    "zeroshot.top1": "acc1",
    "zeroshot.top5": "acc5",
    "zeroshot.mean_per_class_recall": "mean_per_class_recall",
    "zeroshot.mean_average_precision": "mean_average_precision",
    "linear_probe.top1": "acc1",
    "linear_probe.top5": "acc5",
    "linear_probe.mean_per_class_recall": "mean_per_class_recall",
}
_RECALL = re.compile(r"^retrieval\.(i2t|t2i)\.R@(\d+)$")


class BenchmarkSpec(BaseModel):
    """One benchmark of a suite (a bare string is its `path`)."""

    model_config = ConfigDict(extra="forbid")
    path: str
    name: str | None = None
    task: Literal["auto", "zeroshot_classification", "zeroshot_retrieval", "linear_probe"] = "auto"
    split: Literal["train", "val", "test"] = "test"

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name or self.path


class ModelSpec(BaseModel):
    """One model of a suite (a bare string is its `model`)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.model


class Suite(BaseModel):
    """A suite file: models × benchmarks, the baseline of the difference columns, config overrides
    applied to every evaluation, and the metrics the table shows (default: per task)."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelSpec]
    benchmarks: list[BenchmarkSpec]
    baseline: str | None = None
    overrides: dict[str, Any] = {}
    metrics: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_strings(cls, tree: Any) -> Any:
        if isinstance(tree, dict):
            tree = dict(tree)
            for key, field in (("models", "model"), ("benchmarks", "path")):
                if isinstance(tree.get(key), list):
                    tree[key] = [{field: x} if isinstance(x, str) else x for x in tree[key]]
        return tree

    @model_validator(mode="after")
    def _names(self) -> Suite:
        for what, labels in (
            ("model", [m.label for m in self.models]),
            ("benchmark", [b.label for b in self.benchmarks]),
        ):
            if not labels:
                raise ValueError(f"the suite lists no {what}s")
            dup = next((x for x in labels if labels.count(x) > 1), None)
            if dup is not None:
                raise ValueError(f"two {what}s are named {dup!r}: give each a distinct `name`")
        names = [m.label for m in self.models]
        if self.baseline is None:
            self.baseline = names[0]
        elif self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the models {names}")
        return self


def read_suite(path: str | Path) -> Suite:
    """A suite YAML file, validated; ConfigError naming the file and the key otherwise."""
    from mmtune.config import read_yaml_mapping

    tree = read_yaml_mapping(path)
    try:
        return Suite.model_validate(tree)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {loc + ': ' if loc else ''}{first['msg']}") from None


@dataclass
class Benchmark:
    """A benchmark read and screened once, evaluated for every model."""

    spec: BenchmarkSpec
    task: str
    splits: Splits  # the records to evaluate are `splits.test`; a linear probe fits on train (+ val)


def load_benchmark(spec: BenchmarkSpec, cfg) -> Benchmark:
    """Read and screen a benchmark's records; decide its task (`auto`: classification when it has
    class names and every sample a label or labels, else retrieval when it has captions). A linear
    probe also reads the train split (and val when there is one)."""
    from mmtune.data.benchmark import is_benchmark, read_benchmark

    probe = spec.task == LINEAR_PROBE
    fit: dict[str, list] = {"train": [], "val": []}
    if is_benchmark(spec.path):
        table, templates = read_benchmark(spec.path, spec.split)
        splits = Splits([], [], [], classes=table.classes, skipped=Counter(table.skipped), name=spec.label)
        splits.eval_templates = templates or splits.eval_templates
        records = table.records
        if probe:
            fit["train"] = _probe_split(spec, lambda: read_benchmark(spec.path, "train")[0].records)
            if (Path(spec.path) / "val").is_dir() and spec.split != "val":
                fit["val"] = read_benchmark(spec.path, "val")[0].records
    else:
        tree = cfg.data.model_dump()
        builtin = not Path(spec.path).exists()
        tree.update(dataset=spec.path, test=None if builtin else spec.path, val=None)
        splits = load_splits(type(cfg.data).model_validate(tree), cfg.seed)
        records = splits.get(spec.split if builtin else "test")  # a file or folder is read whole
        if probe:
            fit["train"] = _probe_split(spec, lambda: splits.train if builtin else [])
            fit["val"] = splits.val if builtin and spec.split != "val" else []
    d = cfg.data
    good, bad = screen(records, "skip", d.max_image_pixels, d.max_bad_fraction, spec.label)
    if not good:
        raise DataError(f"benchmark {spec.label} ({spec.path}): no usable samples in split {spec.split}")
    for name in fit:
        fit[name], bad_fit = screen(fit[name], "skip", d.max_image_pixels, d.max_bad_fraction, spec.label)
        splits.skipped.update({f"{name}.{k}": v for k, v in bad_fit.items()})
    splits.train, splits.val, splits.test = fit["train"], fit["val"], good
    splits.skipped.update(bad)
    labelled = bool(splits.classes) and all(r.label is not None or r.labels for r in good)
    captioned = any(r.captions for r in good)
    task = spec.task
    if task == "auto":
        task = CLASSIFICATION if labelled else RETRIEVAL
    if task in (CLASSIFICATION, LINEAR_PROBE) and not labelled:
        raise DataError(f"benchmark {spec.label}: {task} needs class names and a label per sample")
    if task == LINEAR_PROBE and any(r.labels for r in good + splits.train):
        raise DataError(f"benchmark {spec.label}: the linear probe takes one label per sample, not several")
    if task == RETRIEVAL and not captioned:
        raise DataError(f"benchmark {spec.label}: retrieval needs captions (.txt members or a caption column)")
    return Benchmark(spec, task, splits)


def _probe_split(spec: BenchmarkSpec, read) -> list:
    """The records a linear probe is fitted on; a one-line error when the benchmark has none."""
    if spec.split == "train":
        raise DataError(f"benchmark {spec.label}: the linear probe fits on the train split; evaluate on another")
    try:
        records = read()
    except DataError:
        records = []
    if not records:
        raise DataError(
            f"benchmark {spec.label} ({spec.path}): the linear probe needs a train split (train/nshards.txt "
            "in a CLIP_benchmark folder, or a built-in dataset); this one has none"
        )
    return records


def linear_probe(model, bench: Benchmark, ctx, processor) -> dict:
    """CLIP_benchmark's linear probe with mmtune's logistic regression: image features of train
    (and val: the benchmark's own, else a seeded VAL_PROPORTION of train) choose C on val; the
    probe is refitted on train + val with that C and scored on the test split."""
    from mmtune.metrics import classification_metrics
    from mmtune.models.linear_probe import C_GRID, fit_logistic, sweep
    from mmtune.tasks.contrastive import embed_images

    sp = bench.splits
    n_classes = len(sp.classes)
    x = {s: embed_images(model, sp.get(s), ctx, processor) for s in ("train", "val", "test") if sp.get(s)}
    y = {s: torch.tensor([r.label for r in sp.get(s)]) for s in x}
    if "val" in x:
        train_x, train_y, val_x, val_y = x["train"], y["train"], x["val"], y["val"]
    else:
        order = torch.randperm(len(y["train"]), generator=torch.Generator().manual_seed(ctx.cfg.seed))
        n_val = max(1, round(VAL_PROPORTION * len(order)))
        held, kept = order[:n_val], order[n_val:]
        train_x, train_y, val_x, val_y = x["train"][kept], y["train"][kept], x["train"][held], y["train"][held]
    chosen = sweep(train_x, train_y, val_x, val_y, n_classes, C_GRID)
    all_x, all_y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])
    w, b = fit_logistic(all_x, all_y, n_classes, chosen.c, (chosen.weight, chosen.bias))
    logits = x["test"].float() @ w.T + b
    metrics = {f"linear_probe.{k}": v for k, v in classification_metrics(logits, y["test"]).items()}
    metrics.update({"linear_probe.C": chosen.c, "linear_probe.train_samples": len(all_y)})
    return metrics


def clip_benchmark_metrics(metrics: dict) -> dict:
    """CLIP_benchmark's names for mmtune's figures: top-k → `accK`, t2i → image retrieval,
    i2t → text retrieval (`image_retrieval_recall@K`: a caption finds its image in the top K)."""
    out = {cb: metrics[k] for k, cb in _ZEROSHOT.items() if k in metrics}
    out.update(
        {f"lp_{cb}": metrics[k] for k, cb in _ZEROSHOT.items() if k in metrics and k.startswith("linear_probe.")}
    )
    for key, value in metrics.items():
        m = _RECALL.match(key)
        if m:
            out[f"{'image' if m.group(1) == 't2i' else 'text'}_retrieval_recall@{m.group(2)}"] = value
    return out


def evaluate_model(spec: ModelSpec, benchmarks: list[Benchmark], overrides: dict | None = None) -> list[dict]:
    """One CLIP_benchmark result per benchmark for one model (built once, evaluated in turn)."""
    from mmtune.api import configure_threads, set_seed
    from mmtune.config import load_config
    from mmtune.tasks import Context, get_task

    cfg = load_config(None, {**(overrides or {}), "task": EVAL_TASK, "model.name": spec.model})
    configure_threads()
    set_seed(cfg.seed)  # a preset's random initialisation is the same in every process
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor, results = None, None, []
    for bench in benchmarks:
        options = {**cfg.options, "zeroshot": bench.task == CLASSIFICATION, "retrieval": bench.task == RETRIEVAL}
        task = get_task(cfg.task)(Context(cfg.model_copy(update={"options": options}), bench.splits, device))
        if model is None:
            model, processor = task.build().to(device).eval(), task.processor
        task.processor = processor
        try:
            with torch.no_grad():
                if bench.task == LINEAR_PROBE:
                    own = linear_probe(model, bench, task.ctx, processor)
                else:
                    own = dict(task.evaluate(model, bench.splits.test).metrics)
        except AttributeError as e:
            raise UserError(f"{spec.model}: not a dual encoder with image and text towers ({e})") from None
        results.append(_result(spec, bench, own))
    return results


def _result(spec: ModelSpec, bench: Benchmark, own: dict) -> dict:
    skipped = bench.splits.skipped
    metrics = {**clip_benchmark_metrics(own), **own, "data.samples": len(bench.splits.test)}
    metrics["data.skipped"] = int(sum(skipped.values()))
    metrics.update({f"data.skipped.{k}": int(v) for k, v in sorted(skipped.items())})
    return {
        "dataset": bench.spec.label,
        "model": spec.label,
        "pretrained": spec.model,
        "task": bench.task,
        "metrics": metrics,
        "language": "en",
        "split": bench.spec.split,
        "path": bench.spec.path,
    }


def run_suite(suite: Suite, out: str | Path, overrides: dict | None = None, log=print) -> dict:
    """Evaluate every model on every benchmark; write each result (CLIP_benchmark's JSON) and the
    table (Markdown, CSV, JSON, SVG plot) into `out`; returns the table."""
    from mmtune.config import load_config
    from mmtune.suite_table import build_table, write_table

    over = {**suite.overrides, **(overrides or {})}
    cfg = load_config(None, {**over, "task": EVAL_TASK})  # the data settings benchmarks are read with
    benchmarks = [load_benchmark(b, cfg) for b in suite.benchmarks]
    out = Path(out)
    results = []
    for spec in suite.models:
        log(f"evaluating {spec.label} on {len(benchmarks)} benchmarks")
        for result in evaluate_model(spec, benchmarks, over):
            folder = out / "results" / safe_name(spec.label)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{safe_name(result['dataset'])}.json").write_text(json.dumps(result, indent=1) + "\n")
            results.append(result)
    table = build_table(suite, results)
    write_table(table, out)
    return table


def safe_name(name: str) -> str:
    """A label as a file name (CLIP_benchmark's slug: `/` → `_`)."""
    return re.sub(r"[^A-Za-z0-9._@+-]+", "_", name).strip("_") or "_"
