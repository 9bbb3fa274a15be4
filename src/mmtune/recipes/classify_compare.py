"""`mmtune classify`: run classification methods on one data/model setup and compare them.

Trained methods go through `mmtune.api.train` (the one loop) into `RUN/METHOD/`; zero-shot, the
linear probe and WiSE-FT are computed here and written as run folders of the same shape. Every
method is then evaluated on val, test and the `data.shift` splits; `RUN/metrics.json` holds
`METHOD.SPLIT.METRIC`, `METHOD.trainable_params`, `METHOD.train_seconds` and `wise-ft.alpha`.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mmtune import api
from mmtune.config import load_config, save_config
from mmtune.data.classes import check_classes, shift_splits
from mmtune.data.prompts import prompt_record, resolve_templates
from mmtune.errors import ConfigError, DataError, UserError
from mmtune.interpolate import interpolate_state
from mmtune.models.classifier import (
    ImageClassifier,
    classify_logits,
    load_classifier,
    require_image_checkpoint,
    require_image_tower,
    save_classifier_spec,
    zeroshot_head,
)
from mmtune.recipes import classify_report as rep
from mmtune.runs import removed_on_failure
from mmtune.tasks import Context
from mmtune.tasks.classify import METHODS, TRAINED, classify_options


@dataclass
class Env:
    """What every method runner shares: config, options, data, base model, context."""

    cfg: object
    opts: object
    run_dir: Path
    classes: list[str]
    templates: list[str]
    model: torch.nn.Module
    processor: object
    ctx: Context
    sets: dict  # split name → records: val, test, then the shift splits
    results: dict = field(default_factory=dict)  # method → Result


@dataclass
class Result:
    clf: ImageClassifier
    trainable: int
    seconds: float
    extra: dict = field(default_factory=dict)  # method-level figures (C, α)
    metrics: dict = field(default_factory=dict)
    logits: dict = field(default_factory=dict)


def run(cfg, overwrite: bool = False) -> dict:
    """Run `options.compare` (or `options.method`); write RUN/; return the flat metrics."""
    opts = classify_options(cfg)
    asked = opts.compare or [opts.method]
    methods = [m for m in METHODS if m in asked]
    if "wise-ft" in methods and "finetune" not in methods:
        raise ConfigError("options.compare: wise-ft interpolates towards finetune: add finetune")
    with removed_on_failure(cfg.run_dir):  # a failure before any result leaves no folder
        run_dir = _fresh(cfg.run_dir, overwrite)
        return _run_methods(_setup(cfg, opts, run_dir), methods)


def _run_methods(env: Env, methods: list[str]) -> dict:
    run_dir = env.run_dir
    for method in methods:
        res = RUNNERS[method](env) if method not in TRAINED else _trained(env, method)
        res.metrics, res.logits = evaluate_all(res.clf, env)
        env.results[method] = res
        _write_method(env, method, res)
        print(f"{method}: " + ", ".join(f"{k} {v:.4f}" for k, v in _headline(res).items()))
    metrics = _flat_metrics(env)
    api.write_metrics(run_dir, metrics)
    _write_comparison(env)
    from mmtune.report import write_report

    write_report(run_dir)
    return metrics


def _fresh(run_dir: Path, overwrite: bool) -> Path:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{run_dir} already holds a run: pass --overwrite or pick name=")
        if not (run_dir / "config.yaml").is_file():  # never delete a folder that is not a run
            raise UserError(f"{run_dir} is not a run folder (no config.yaml): not overwriting it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _setup(cfg, opts, run_dir: Path) -> Env:
    from mmtune.models import load_model

    api.configure_threads()
    api.set_seed(cfg.seed)
    splits = api.build_data(cfg)
    classes = check_classes(splits)
    if not splits.test:
        raise DataError(f"{splits.name}: no test split; set data.test (val chooses C and α, test reports)")
    require_image_checkpoint(cfg.model)
    model, processor = load_model(cfg.model)
    require_image_tower(model, cfg.model.name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    ctx = Context(cfg, splits, device)
    save_config(cfg, run_dir / "config.yaml")
    sets = {"val": splits.val, "test": splits.test, **shift_splits(cfg.data, splits.keys)}
    templates = resolve_templates(opts.templates, splits.template_sets())
    return Env(cfg, opts, run_dir, classes, templates, model, processor, ctx, sets)


# ------------------------------------------------------------------ methods


def _zeroshot(env: Env) -> Result:
    start = time.perf_counter()
    head = zeroshot_head(env.model, env.classes, env.templates, env.ctx, env.processor)
    return Result(ImageClassifier(env.model, head), 0, time.perf_counter() - start)


def _linear_probe(env: Env) -> Result:
    from safetensors.torch import save_file

    from mmtune.models.linear_probe import C_GRID, sweep
    from mmtune.tasks.contrastive import embed_images

    start = time.perf_counter()
    splits = env.ctx.splits
    feats = {s: embed_images(env.model, splits.get(s), env.ctx, env.processor) for s in ("train", "val", "test")}
    labels = {s: torch.tensor([r.label for r in splits.get(s)]) for s in feats}
    grid = tuple(env.opts.probe_c_grid or C_GRID)
    res = sweep(feats["train"], labels["train"], feats["val"], labels["val"], len(env.classes), grid)
    seconds = time.perf_counter() - start
    out = env.run_dir / "linear-probe"
    out.mkdir(parents=True, exist_ok=True)
    cache = {f"{s}.x": feats[s].contiguous() for s in feats}
    cache.update({f"{s}.y": labels[s].contiguous() for s in labels})
    save_file(cache, str(out / "features.safetensors"))  # the cached features the probe saw
    sweep_rows = [[c, acc] for c, acc in res.val_top1.items()]
    rep.write_table(out, "c_sweep", "Regularisation sweep (val top-1 per C)", ["C", "val top1"], sweep_rows)
    clf = ImageClassifier(env.model, res.weight, res.bias)
    return Result(clf, res.weight.numel() + res.bias.numel(), seconds, {"C": res.c})


def _trained(env: Env, method: str) -> Result:
    overrides = {"name": method, "output_dir": str(env.run_dir), "options.method": method}
    if method == "lp-ft" and "linear-probe" in env.results:
        overrides["options.init_head"] = str(env.run_dir / "linear-probe")
    overrides.update(env.opts.per_method.get(method, {}))
    sub = load_config(env.run_dir / "config.yaml", overrides)
    metrics = api.train(sub)
    clf, _, info = load_classifier(env.run_dir / method, env.ctx)
    clf.to(env.ctx.device)
    if method == "lora":
        _export_merged(clf, env, info)
    return Result(clf, info["trainable_params"], metrics["train.seconds"])


def _export_merged(clf, env: Env, info: dict) -> None:
    """RUN/lora/merged/: adapters folded into the base weights, a self-contained model folder."""
    from mmtune.checkpoint import save_checkpoint
    from mmtune.models.lora import merge_lora

    merged = merge_lora(copy.deepcopy(clf))
    folder = env.run_dir / "lora" / "merged"
    save_checkpoint(folder, merged, meta={"merged_from": "checkpoints/last"})
    info = {k: v for k, v in info.items() if k != "lora"}
    save_classifier_spec(merged.backbone, env.processor, folder, info)


def _wise_ft(env: Env) -> Result:
    """θ(α) = (1−α)·θ_zeroshot + α·θ_finetune on the α grid; α chosen on val (top-1, then loss)."""
    zs = env.results.get("zeroshot") or _zeroshot(env)
    ft = env.results["finetune"]
    zs_state, ft_state = zs.clf.state_dict(), ft.clf.state_dict()
    mixed = copy.deepcopy(ft.clf)
    curve, best, best_key = [], None, None
    for alpha in sorted(env.opts.alphas):
        mixed.load_state_dict(interpolate_state(zs_state, ft_state, alpha))
        metrics, _ = evaluate_all(mixed, env)
        curve.append({"alpha": alpha, **{k: v for k, v in metrics.items() if k.endswith(".top1")}})
        key = (metrics["val.top1"], -metrics["val.loss"])
        if best_key is None or key > best_key:
            best, best_key = alpha, key
    mixed.load_state_dict(interpolate_state(zs_state, ft_state, best))
    return Result(mixed, ft.trainable, ft.seconds, {"alpha": best, "curve": curve})


RUNNERS = {"zeroshot": _zeroshot, "linear-probe": _linear_probe, "wise-ft": _wise_ft}


# ------------------------------------------------------------------ evaluation and output


def evaluate_all(clf, env: Env) -> tuple[dict, dict]:
    """({SPLIT.top1/top5/mean_per_class_recall/loss}, {split: logits (N, C)}) on every split.

    With several shift splits, `shift.*` is their mean and each is also `shift.NAME.*`.
    """
    from mmtune.metrics import classification_metrics

    clf.eval()
    logits, metrics, per_shift = {}, {}, {}
    for name, records in env.sets.items():
        lg = classify_logits(clf, records, env.ctx, env.processor)
        y = torch.tensor([r.label for r in records])
        m = classification_metrics(lg, y)
        m["loss"] = float(F.cross_entropy(lg, y))
        logits[name] = lg
        if name in ("val", "test"):
            metrics.update({f"{name}.{k}": v for k, v in m.items()})
        else:
            per_shift[name] = m
    if per_shift:
        for k in next(iter(per_shift.values())):
            metrics[f"shift.{k}"] = sum(m[k] for m in per_shift.values()) / len(per_shift)
            if len(per_shift) > 1:
                metrics.update({f"shift.{n}.{k}": m[k] for n, m in per_shift.items()})
    return metrics, logits


def _headline(res: Result) -> dict:
    return {k: v for k, v in res.metrics.items() if k in ("val.top1", "test.top1", "shift.top1")}


def _labels(env: Env) -> dict:
    return {name: [r.label for r in recs] for name, recs in env.sets.items()}


def _write_method(env: Env, method: str, res: Result) -> None:
    """RUN/METHOD/: checkpoint + spec (untrained methods), metrics, per-class table, confusion."""
    from mmtune.checkpoint import save_checkpoint
    from mmtune.report import write_report

    folder = env.run_dir / method
    if method not in TRAINED:
        record = prompt_record(env.classes, env.templates, env.opts.templates, env.cfg.data.classnames)
        info = {"method": method, **record, "head": "linear", "trainable_params": res.trainable}
        save_checkpoint(folder / "checkpoints" / "best", res.clf)
        save_classifier_spec(res.clf.backbone, env.processor, folder / "model", info)
        save_config(env.cfg, folder / "config.yaml")
    # api.train counts parameters before the task builds the classifier: record what trained
    figures = {**res.metrics, "model.trainable_params": int(res.trainable)}
    figures.update({f"{method}.{k}": v for k, v in res.extra.items() if k != "curve"})
    old = folder / "metrics.json"
    merged = {**(json.loads(old.read_text()) if old.is_file() else {}), **figures}
    api.write_metrics(folder, merged)
    labels = _labels(env)
    columns, rows = rep.per_class_rows(env.classes, res.logits, labels)
    rep.write_table(folder, "per_class", f"{method}: per-class results", columns, rows)
    preds = res.logits["test"].argmax(1).numpy()
    rep.confusion_png(
        preds,
        labels["test"],
        env.classes,
        folder / "plots" / "confusion_test.png",
        f"{method}: confusion matrix (test)",
    )
    write_report(folder)


def _flat_metrics(env: Env) -> dict:
    out = {}
    for method, res in env.results.items():
        out.update({f"{method}.{k}": v for k, v in res.metrics.items()})
        out[f"{method}.trainable_params"] = int(res.trainable)
        out[f"{method}.train_seconds"] = round(float(res.seconds), 3)
        out.update({f"{method}.{k}": v for k, v in res.extra.items() if k != "curve"})
    return out


def _write_comparison(env: Env) -> None:
    has_shift = any("shift.top1" in r.metrics for r in env.results.values())
    columns = ["method", "test top-1", "test top-5", "test mean recall"]
    columns += ["shift top-1"] * has_shift + ["val top-1", "trainable params", "train s"]
    rows = []
    for method, res in env.results.items():
        m = res.metrics
        row = [method, m["test.top1"], m["test.top5"], m["test.mean_per_class_recall"]]
        row += [m.get("shift.top1")] * has_shift
        rows.append(row + [m["val.top1"], int(res.trainable), round(float(res.seconds), 1)])
    rep.write_table(env.run_dir, "1_comparison", "Methods compared", columns, rows)
    labels = _labels(env)["test"]
    recalls = {m: _recalls(r.logits["test"], labels, len(env.classes)) for m, r in env.results.items()}
    rows = [[c] + [recalls[m][i] for m in recalls] for i, c in enumerate(env.classes)]
    rep.write_table(env.run_dir, "2_per_class", "Per-class test recall", ["class", *recalls], rows)
    wise = env.results.get("wise-ft")
    if wise:
        curve, alpha = wise.extra["curve"], wise.extra["alpha"]
        cols = list(curve[0])
        rep.write_table(
            env.run_dir, "3_wise_ft", "WiSE-FT: top-1 per α", cols, [[row[c] for c in cols] for row in curve]
        )
        rep.alpha_curve_png(curve, alpha, env.run_dir / "plots" / "wise_ft_alpha.png")


def _recalls(logits: torch.Tensor, labels: list[int], n_classes: int) -> list[float | None]:
    from mmtune.metrics import confusion_matrix

    cm = confusion_matrix(logits.argmax(1), labels, n_classes)
    return [round(cm[c, c] / cm[c].sum(), 4) if cm[c].sum() else None for c in range(n_classes)]
