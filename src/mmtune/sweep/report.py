"""A sweep's trials.csv and report.html: trials table, history, importances, parallel coordinates."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from mmtune.report import format_value, html_cards, html_document, html_figure, html_section, html_table


def trial_rows(study) -> list[dict]:
    """One flat dict per trial: number, state, value, parameters, steps and seconds."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        row = {"trial": t.number, "state": t.state.name, "value": t.value}
        row.update(t.params)
        row.update({k: a.get(k) for k in ("steps", "planned_steps", "seconds", "run")})
        if t.state.name == "PRUNED" and t.intermediate_values:
            row["value"] = t.intermediate_values[max(t.intermediate_values)]
        rows.append(row)
    return rows


def pruning_figures(rows: list[dict]) -> dict:
    """Trials by state, mean seconds per trial, and the time pruning saved (by planned steps)."""
    finished = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED") and r.get("seconds")]
    pruned = [r for r in finished if r["state"] == "PRUNED"]
    saved = 0.0
    for r in pruned:
        per_step = r["seconds"] / max(1, r["steps"] or 1)
        saved += per_step * max(0, (r["planned_steps"] or 0) - (r["steps"] or 0))
    spent = sum(r["seconds"] for r in finished)
    return {
        "trials.complete": sum(r["state"] == "COMPLETE" for r in rows),
        "trials.pruned": len(pruned),
        "trials.failed": sum(r["state"] == "FAIL" for r in rows),
        "seconds_per_trial": round(spent / max(1, len(finished)), 2),
        "trial_seconds": round(spent, 1),
        "pruning_saved_seconds": round(saved, 1),
    }


def write_trials_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def _history(rows: list[dict], higher: bool, path: Path) -> None:
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    for state, colour in (("COMPLETE", "tab:blue"), ("PRUNED", "tab:gray")):
        pts = [(r["trial"], r["value"]) for r in rows if r["state"] == state and r["value"] is not None]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=18, c=colour, label=state.lower())
    done = sorted((r["trial"], r["value"]) for r in rows if r["state"] == "COMPLETE")
    best, xs, ys = None, [], []
    for n, v in done:
        best = v if best is None or (v > best if higher else v < best) else best
        xs.append(n)
        ys.append(best)
    ax.step(xs, ys, where="post", c="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel="objective (val)", title="Optimisation history")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _curves(study, path: Path) -> None:
    """Each trial's validation figure at its evaluations; pruned trials end where they stopped."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    for t in study.get_trials(deepcopy=False):
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            pruned = t.state.name == "PRUNED"
            ax.plot(
                steps,
                [t.intermediate_values[s] for s in steps],
                marker=".",
                c="0.6" if pruned else "tab:blue",
                ls="--" if pruned else "-",
                lw=1,
            )
    ax.set(xlabel="step", ylabel="objective (val)", title="Validation curves (dashed grey: pruned)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _importances(study, path: Path) -> dict:
    import optuna

    try:
        imp = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # too few completed trials, or one value everywhere
        return {}
    fig = Figure(figsize=(6, 0.5 + 0.45 * max(1, len(imp))))
    ax = fig.add_subplot()
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance (fANOVA)", title="Parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return imp


def _parallel(rows: list[dict], params: list[str], path: Path) -> None:
    """One line per completed trial across parameter axes scaled to [0, 1], coloured by value."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    axes = params + ["value"]
    fig = Figure(figsize=(1.6 * len(axes) + 2, 3.8))
    ax = fig.add_subplot()
    cols = {k: [_axis_value(r[k], k) for r in done] for k in axes}
    lo = {k: min(v) for k, v in cols.items()}
    hi = {k: max(v) for k, v in cols.items()}
    values = cols["value"]
    vmin, vmax = min(values), max(values)
    cm = matplotlib.colormaps["viridis"]
    for i in range(len(done)):
        ys = [(cols[k][i] - lo[k]) / ((hi[k] - lo[k]) or 1) for k in axes]
        ax.plot(range(len(axes)), ys, c=cm((values[i] - vmin) / ((vmax - vmin) or 1)), alpha=0.8)
    for i in range(len(axes)):
        ax.axvline(i, c="0.6", lw=0.8)
    ax.set_xticks(range(len(axes)), [_label(k, lo[k], hi[k]) for k in axes], fontsize=8)
    ax.set_yticks([])
    ax.set_title("Parallel coordinates (completed trials; colour = objective)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _axis_value(v, key: str) -> float:
    if key.endswith("lr") and isinstance(v, float) and v > 0:
        return math.log10(v)  # learning rates vary over decades: compare them on a log axis
    return float(v) if isinstance(v, (int, float)) else float(hash(str(v)) % 997)


def _label(key: str, lo: float, hi: float) -> str:
    log = "log10 " if key.endswith("lr") else ""
    return f"{key}\n{log}{format_value(lo)} … {format_value(hi)}"


def write_report(folder: Path, rows: list[dict], summary: dict, study) -> Path:
    """folder/report.html with its PNGs under folder/plots/."""
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    higher = summary["higher_is_better"]
    _history(rows, higher, plots / "history.png")
    params = list(summary["best_params"])
    _parallel(rows, params, plots / "parallel.png")
    imp = _importances(study, plots / "importances.png")
    metric = summary["metric"]
    cards = {f"best val {metric}": summary["best_value"], "best trial": summary["best_trial"]}
    cards[f"best test {metric}"] = summary["best_test"].get(metric)
    if summary.get("baseline_test"):
        cards[f"baseline {summary['baseline_test']['split']} {metric}"] = summary["baseline_test"].get(metric)
    cards.update(
        {
            k: summary[k]
            for k in (
                "trials.complete",
                "trials.pruned",
                "seconds_per_trial",
                "pruning_saved_seconds",
                "search_seconds",
                "trial_cache",
            )
        }
    )
    columns = list(dict.fromkeys(k for r in rows for k in r))
    body = f"<h1>Sweep {summary['sweep']}</h1>" + html_cards(cards)
    body += html_section("Trials", html_table(columns, [[r.get(c) for c in columns] for r in rows]))
    _curves(study, plots / "curves.png")
    figs = html_figure(plots / "history.png", "optimisation history")
    figs += html_figure(plots / "curves.png", "validation curves per trial")
    if imp:
        figs += html_figure(plots / "importances.png", "parameter importances")
    figs += html_figure(plots / "parallel.png", "parallel coordinates")
    body += html_section("Search", figs)
    test = summary["best_test"]
    base = summary.get("baseline_test") or {}
    keys = [k for k in test if base.get(k) is not None] or list(test)
    rows_t = [[k, test.get(k), base.get(k)] for k in keys]
    body += html_section(
        "Test split: best trial (evaluated once) vs baseline", html_table(["figure", "best trial", "baseline"], rows_t)
    )
    out = folder / "report.html"
    out.write_text(html_document(f"sweep {summary['sweep']}", body))
    return out
