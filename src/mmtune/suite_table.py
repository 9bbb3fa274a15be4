"""A suite's table: one row per (benchmark, metric), one column per model, and the difference of
each model from the baseline (the "forgetting" column of a fine-tune); as Markdown, CSV, JSON and
an SVG bar chart."""

from __future__ import annotations

import csv
import io
import json
from html import escape
from pathlib import Path

FILES = ("table.json", "table.csv", "table.md", "table.svg", "report.html")


def build_table(suite, results: list[dict]) -> dict:
    """{"baseline", "models", "rows": [{"benchmark", "task", "metric", "values": {model: v},
    "diff": {model: v - baseline}}]} from CLIP_benchmark results; a metric a result lacks is null."""
    from mmtune.suite import TABLE_METRICS

    models = [m.label for m in suite.models]
    base = suite.baseline
    found = {(r["model"], r["dataset"]): r for r in results}
    rows = []
    for bench in suite.benchmarks:
        task = found[(models[0], bench.label)]["task"]
        reported = [found[(m, bench.label)]["metrics"] for m in models]
        default = [k for k in TABLE_METRICS[task] if any(k in r for r in reported)]
        for metric in suite.metrics or default:
            values = {m: found[(m, bench.label)]["metrics"].get(metric) for m in models}
            diff = {
                m: None if values[m] is None or values[base] is None else values[m] - values[base]
                for m in models
                if m != base
            }
            rows.append({"benchmark": bench.label, "task": task, "metric": metric, "values": values, "diff": diff})
    return {"baseline": base, "models": models, "rows": rows}


def _header(table: dict) -> list[str]:
    others = [m for m in table["models"] if m != table["baseline"]]
    return ["benchmark", "task", "metric", *table["models"], *(f"Δ {m} vs {table['baseline']}" for m in others)]


def _cells(row: dict, fmt) -> list[str]:
    shown = [fmt(v) for v in row["values"].values()] + [fmt(v, True) for v in row["diff"].values()]
    return [row["benchmark"], row["task"], row["metric"], *shown]


def to_csv(table: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_header(table))
    for row in table["rows"]:
        w.writerow(_cells(row, lambda v, _=False: "" if v is None else repr(float(v))))
    return buf.getvalue()


def to_markdown(table: dict) -> str:
    def fmt(v, signed=False):
        return "–" if v is None else f"{v:+.4f}" if signed else f"{v:.4f}"

    head = _header(table)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(_cells(row, fmt)) + " |" for row in table["rows"]]
    return "\n".join(lines) + "\n"


_COLOURS = ("#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5")


def to_svg(table: dict) -> str:
    """Grouped bars: one group per (benchmark, metric), one bar per model, scores on 0–1."""
    models, rows = table["models"], table["rows"]
    bar, gap, height, left, top = 14, 18, 220, 48, 20
    group = bar * len(models) + gap
    width = left + group * len(rows) + 20
    legend_y = top + height + 96
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{legend_y + 18 * len(models) + 10}" '
        'font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
    ]
    for tick in range(6):
        y = top + height - tick * height / 5
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick / 5:.1f}</text>')
    for g, row in enumerate(rows):
        x0 = left + g * group + gap / 2
        for i, m in enumerate(models):
            v = row["values"][m]
            h = 0.0 if v is None else max(0.0, min(1.0, float(v))) * height
            title = f"{row['benchmark']} {row['metric']} {m}: {'n/a' if v is None else f'{v:.4f}'}"
            out.append(
                f'<rect x="{x0 + i * bar:.1f}" y="{top + height - h:.1f}" width="{bar - 2}" height="{h:.1f}" '
                f'fill="{_COLOURS[i % len(_COLOURS)]}"><title>{escape(title)}</title></rect>'
            )
        cx, cy = x0 + bar * len(models) / 2, top + height + 10
        label = escape(f"{row['benchmark']} · {row['metric']}")
        out.append(f'<text x="{cx:.1f}" y="{cy}" transform="rotate(35 {cx:.1f} {cy})">{label}</text>')
    for i, m in enumerate(models):
        y = legend_y + 18 * i
        out.append(f'<rect x="{left}" y="{y}" width="12" height="12" fill="{_COLOURS[i % len(_COLOURS)]}"/>')
        out.append(f'<text x="{left + 18}" y="{y + 10}">{escape(m)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def to_html(table: dict) -> str:
    """report.html: one self-contained page, the table and the SVG plot inlined."""
    rows = [
        _cells(row, lambda v, signed=False: "–" if v is None else f"{v:+.4f}" if signed else f"{v:.4f}")
        for row in table["rows"]
    ]
    head = "".join(f"<th>{escape(h)}</th>" for h in _header(table))
    body = "\n".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>" for cells in rows)
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}td:nth-child(n+4){text-align:right}"
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Benchmark suite</title>'
        f"<style>{style}</style></head><body>\n<h1>Benchmark suite</h1>\n"
        f"<p>Baseline: {escape(table['baseline'])}; Δ columns are each model minus the baseline.</p>\n"
        f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>\n"
        f"<h2>Scores</h2>\n{to_svg(table)}</body></html>\n"
    )


def write_table(table: dict, out: str | Path) -> list[Path]:
    """table.json, table.csv, table.md, table.svg and report.html in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = (json.dumps(table, indent=1) + "\n", to_csv(table), to_markdown(table), to_svg(table), to_html(table))
    for name, text in zip(FILES, texts, strict=True):
        (out / name).write_text(text, encoding="utf-8")
    return [out / name for name in FILES]
