"""Report pieces of `mmtune classify`: tables (tables/*.json) and plots (plots/*.png)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mmtune.metrics import confusion_matrix, ratio
from mmtune.metrics import per_class_rows as class_rows


def write_table(run_dir: Path, name: str, title: str, columns: list, rows: list) -> None:
    """tables/NAME.json in the shape report.py renders."""
    (run_dir / "tables").mkdir(parents=True, exist_ok=True)
    spec = {"title": title, "columns": columns, "rows": rows}
    (run_dir / "tables" / f"{name}.json").write_text(json.dumps(spec, indent=1) + "\n")


def per_class_rows(classes, logits: dict, labels: dict) -> tuple[list, list]:
    """(columns, rows): per class its test support, precision, recall, and recall per shift split."""
    preds = {s: lg.argmax(1).numpy() for s, lg in logits.items()}
    y = {s: np.asarray(v) for s, v in labels.items()}
    cm = confusion_matrix(preds["test"], y["test"], len(classes))
    shifts = [s for s in logits if s not in ("val", "test")]
    columns = ["class", "test support", "test precision", "test recall"]
    columns += [f"{s} recall" for s in shifts]
    rows = class_rows(classes, cm)
    for c, row in enumerate(rows):
        for s in shifts:
            mask = y[s] == c
            row.append(ratio((preds[s][mask] == c).sum(), mask.sum()))
    return columns, rows


def confusion_png(preds, labels, classes: list[str], path: Path, title: str) -> None:
    """A confusion-matrix heat map (rows: true class, columns: prediction) with the counts."""
    cm = confusion_matrix(np.asarray(preds), np.asarray(labels), len(classes))
    n = len(classes)
    side = min(12.0, 2.5 + 0.45 * n)
    fig = Figure(figsize=(side, side * 0.9), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set(title=title, xlabel="predicted", ylabel="true", xticks=range(n), yticks=range(n))
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize="small")
    ax.set_yticklabels(classes, fontsize="small")
    if n <= 30:
        top = cm.max() or 1
        for i in range(n):
            for j in range(n):
                colour = "white" if cm[i, j] > top / 2 else "black"
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7, color=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def alpha_curve_png(curve: list[dict], chosen: float, path: Path) -> None:
    """WiSE-FT: top-1 against α, in-distribution splits left and shift splits right (own scales)."""
    fig = Figure(figsize=(10, 4.2), dpi=100, layout="constrained")
    alphas = [row["alpha"] for row in curve]
    splits = [k for k in curve[0] if k != "alpha"]
    groups = {
        "in distribution": [s for s in splits if s.split(".")[0] in ("val", "test")],
        "distribution shift": [s for s in splits if s.split(".")[0] not in ("val", "test")],
    }
    groups = {title: keys for title, keys in groups.items() if keys}
    for i, (title, keys) in enumerate(groups.items(), 1):
        ax = fig.add_subplot(1, len(groups), i)
        for split in keys:
            ax.plot(alphas, [row[split] for row in curve], marker="o", ms=4, label=split)
        ax.axvline(chosen, color="grey", ls="--", lw=1, label=f"chosen on val: α={chosen:g}")
        ax.set(title=f"WiSE-FT, {title}", xlabel="α (0 = zero-shot, 1 = fine-tuned)", ylabel="top-1 accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
