"""Build a self-contained HTML report (inline CSS, base64 PNGs) from a training run folder."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from html import escape
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mmtune.errors import UserError

OWN_PLOTS = ("train_loss.png", "lr.png", "eval.png")
_AXIS_KEYS = frozenset({"kind", "step", "epoch", "time"})
# Last key segments that name a task score worth putting at the top of the report.
_HEADLINE = re.compile(r"^(top-?1|acc|accuracy|balanced_accuracy|R@1|f1|macro_f1|map|auc|mean_recall)$", re.I)
_MAX_HEADLINE = 8
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1d2330;
 background:#f6f7f9;margin:0}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px}
h1{margin:0 0 4px;font-size:26px;word-break:break-all}
h2{margin:32px 0 10px;font-size:20px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
h3{margin:18px 0 6px;font-size:16px}
.sub{color:#5b6474;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:14px}
.card{background:#fff;border:1px solid #d8dce3;border-radius:8px;padding:10px 16px;min-width:140px}
.card .v{font-size:24px;font-weight:600}.card .k{color:#5b6474;font-size:13px}
table{border-collapse:collapse;background:#fff;margin:4px 0 8px;font-size:14px}
th,td{border:1px solid #d8dce3;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#eef0f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}
figure{margin:12px 0;background:#fff;border:1px solid #d8dce3;border-radius:8px;padding:8px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{text-align:center;color:#5b6474;font-size:13px}
pre{background:#fff;border:1px solid #d8dce3;border-radius:8px;padding:12px;overflow-x:auto;
 font-size:13px}
.note{color:#9a4b00}
.examples{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px;margin:4px 0 12px}
.examples figure{margin:0;padding:6px}
.examples img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated}
.examples figcaption{text-align:left;font-size:12px;overflow-wrap:anywhere}
"""


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    """Read one JSON object per line; a missing file gives [], bad lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a truncated last line; the lines before it still count.
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records


def _is_num(value: Any) -> bool:
    """Whether value is an int or float (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_value(value: Any, none: str = "NaN") -> str:
    """Format a value for display: ints as ints, floats to 4 significant digits."""
    if value is None:
        return none  # metrics writers turn a NaN into null
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and 1e4 <= abs(value) < 1e15:
            return f"{value:,.0f}"  # "4.123e+04" is harder to read than "41,234"
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def _group(key: str) -> str:
    """The metric group: the key's prefix before its first dot."""
    return key.split(".", 1)[0] if "." in key else "general"


def _numeric_keys(records: list[dict], keep: Callable[[str], bool]) -> list[str]:
    """Keys (in first-seen order) that hold a number in at least one record."""
    keys: dict[str, None] = {}
    for rec in records:
        for key, value in rec.items():
            if key not in _AXIS_KEYS and _is_num(value) and keep(key):
                keys[key] = None
    return list(keys)


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(step, value) pairs for key; nulls become NaN so the line shows a gap."""
    xs, ys = [], []
    for i, rec in enumerate(records):
        if key in rec:
            step = rec.get("step")
            xs.append(float(step) if _is_num(step) else float(i))
            ys.append(float(rec[key]) if _is_num(rec[key]) else math.nan)
    return xs, ys


def _plot(path: Path, records: list[dict], keys: list[str], title: str, ylabel: str) -> bool:
    """Draw one line per key against step and save it as PNG; False when nothing is finite."""
    series = {k: _series(records, k) for k in keys}
    series = {k: xy for k, xy in series.items() if any(math.isfinite(y) for y in xy[1])}
    if not series:
        return False
    # A bare Figure renders through Agg without pyplot: no global backend switch, nothing to close.
    fig = Figure(figsize=(8, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for key, (xs, ys) in series.items():
        # "$" would start matplotlib mathtext and can fail to parse on an arbitrary key.
        label = key.replace("$", r"\$")
        ax.plot(xs, ys, marker="o" if len(xs) <= 25 else None, ms=3, lw=1.4, label=label)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ncols = 1 + (len(series) - 1) // 16
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), ncols=ncols)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return True


def _make_plots(plots_dir: Path, records: list[dict]) -> list[tuple[Path, str]]:
    """Make the standard curves from metrics.jsonl records; return (path, caption) of each made."""
    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    specs = [
        ("train_loss.png", train, lambda k: k.startswith("loss"), "Training loss", "loss"),
        ("lr.png", train, lambda k: k == "lr", "Learning rate", "lr"),
        ("eval.png", evals, lambda k: True, "Evaluation metrics", "value"),
    ]
    made = []
    for name, recs, keep, title, ylabel in specs:
        keys = _numeric_keys(recs, keep)
        if keys and _plot(plots_dir / name, recs, keys, title, ylabel):
            made.append((plots_dir / name, title))
    return made


def _read_json(path: Path, label: str, notes: list[str]) -> Any:
    """Parse a JSON file; on failure add a note and return None so one bad file keeps the rest."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        notes.append(f"could not read {label}: {err}")
        return None


def _headline(final: dict, evals: list[dict]) -> dict[str, Any]:
    """Pick the figures shown first: task scores from metrics.json, else from the last eval."""
    last_eval = {k: v for k, v in (evals[-1] if evals else {}).items() if k not in _AXIS_KEYS}
    for source in (final, last_eval):
        picked = {
            k: v for k, v in source.items() if (_is_num(v) or v is None) and _HEADLINE.match(k.rsplit(".", 1)[-1])
        }
        if picked:
            return dict(list(picked.items())[:_MAX_HEADLINE])
    # No recognised score: the first plain numbers outside bookkeeping groups still beat nothing.
    rest = {k: v for k, v in final.items() if _is_num(v) and _group(k) not in ("data", "train")}
    return dict(list(rest.items())[:_MAX_HEADLINE])


def html_table(columns: Iterable[Any], rows: Iterable[Iterable[Any]], none: str = "") -> str:
    """An HTML table; every cell is escaped and numbers are right-aligned."""
    head = "".join(f"<th>{escape(format_value(c, none))}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if _is_num(c) else ''}>{escape(format_value(c, none))}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _metric_tables(final: dict) -> str:
    """metrics.json as one table per group (prefix before the first dot)."""
    groups: dict[str, list[tuple[str, Any]]] = {}
    for key, value in final.items():
        name = key.split(".", 1)[1] if "." in key else key
        groups.setdefault(_group(key), []).append((name, value))
    return "".join(
        f"<h3>{escape(group)}</h3>" + html_table(["metric", "value"], items, none="NaN")
        for group, items in groups.items()
    )


def _specs(run_dir: Path, folder: str, notes: list[str], last_column: str | None = None):
    """(path, spec) of every FOLDER/*.json holding {title, columns, rows} (the last column named
    `last_column` when given); a bad file becomes a note."""
    for path in sorted((run_dir / folder).glob("*.json")):
        label = f"{folder}/{path.name}"
        spec = _read_json(path, label, notes)
        if spec is None:
            continue
        ok = isinstance(spec, dict) and isinstance(spec.get("columns"), list) and isinstance(spec.get("rows"), list)
        if not ok or (last_column and spec["columns"][-1:] != [last_column]):
            need = f" (the last: {last_column})" if last_column else ""
            notes.append(f"{label}: expected an object with title, columns{need} and rows")
            continue
        yield path, spec


def _extra_tables(run_dir: Path, notes: list[str]) -> str:
    """Render every tables/*.json holding {title, columns, rows}."""
    parts = []
    for path, spec in _specs(run_dir, "tables", notes):
        rows = [row if isinstance(row, list) else [row] for row in spec["rows"]]
        title = spec.get("title") or path.stem
        parts.append(f"<h3>{escape(format_value(title))}</h3>" + html_table(spec["columns"], rows))
    return "".join(parts)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def html_figure(path: Path, caption: str) -> str:
    """An <img> with the PNG inlined as a base64 data URI, so the report is one file."""
    cap = escape(caption)
    return f'<figure><img src="{_data_uri(path)}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'


def _example_card(run_dir: Path, columns: list, row: list) -> str:
    """One example: its thumbnail (the row's last cell, a path inside the run) and its values."""
    *values, rel = row
    path = (run_dir / str(rel)).resolve()
    inside = path.is_relative_to(run_dir.resolve()) and path.is_file()
    img = f'<img src="{_data_uri(path)}" alt="{escape(str(values[0]))}">' if inside else ""
    lines = "<br>".join(f"{escape(str(c))}: {escape(format_value(v))}" for c, v in zip(columns, values, strict=False))
    return f"<figure>{img}<figcaption>{lines}</figcaption></figure>"


def _examples(run_dir: Path, notes: list[str]) -> str:
    """Every examples/*.json ({title, columns, rows}; a row's last cell is its thumbnail) as cards."""
    parts = []
    for path, spec in _specs(run_dir, "examples", notes, last_column="image"):
        columns = spec["columns"]
        rows = [r for r in spec["rows"] if isinstance(r, list) and len(r) == len(columns)]
        cards = "".join(_example_card(run_dir, columns[:-1], r) for r in rows)
        title = escape(format_value(spec.get("title") or path.stem))
        parts.append(f"<h3>{title}</h3>" + (f'<div class="examples">{cards}</div>' if cards else "<p>none</p>"))
    return "".join(parts)


def html_section(title: str, content: str) -> str:
    """A titled section, or nothing when content is empty."""
    return f"<section><h2>{escape(title)}</h2>{content}</section>" if content else ""


def _summary(records: list[dict]) -> str:
    """One line: how much the run logged and when the report was made."""
    n_train = sum(r.get("kind", "train") == "train" for r in records)
    n_eval = sum(r.get("kind") == "eval" for r in records)
    steps = [r["step"] for r in records if _is_num(r.get("step"))]
    parts = [f"{n_train} train records", f"{n_eval} eval records"]
    if steps:
        parts.append(f"last step {format_value(max(steps))}")
    parts.append(f"report made {time.strftime('%Y-%m-%d %H:%M')}")
    return escape(" · ".join(parts))


def _extra_plots(plots_dir: Path) -> list[tuple[Path, str]]:
    """PNGs in plots/ that report.py does not make (e.g. a task's confusion matrix)."""
    if not plots_dir.is_dir():
        return []
    return [
        (p, p.stem)
        for p in sorted(plots_dir.iterdir())
        if p.suffix.lower() == ".png" and p.is_file() and p.name not in OWN_PLOTS
    ]


def html_cards(headline: dict[str, Any]) -> str:
    """The headline numbers as large cards."""
    cards = "".join(
        f'<div class="card"><div class="v">{escape(format_value(v))}</div><div class="k">{escape(k)}</div></div>'
        for k, v in headline.items()
    )
    return f'<div class="cards">{cards}</div>' if cards else ""


def html_document(title: str, body: str) -> str:
    """Wrap body in a complete HTML page with the inline stylesheet."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write run_dir/report.html (plots under run_dir/plots/) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    notes: list[str] = []
    records = read_jsonl(run_dir / "metrics.jsonl")
    final = _read_json(run_dir / "metrics.json", "metrics.json", notes)
    if final is not None and not isinstance(final, dict):
        notes.append("metrics.json: expected a JSON object")
    final = final if isinstance(final, dict) else {}
    made = _make_plots(run_dir / "plots", records)
    extra = _extra_plots(run_dir / "plots")
    tables = _extra_tables(run_dir, notes)
    evals = [r for r in records if r.get("kind") == "eval"]
    config = run_dir / "config.yaml"
    config_text = config.read_text(encoding="utf-8", errors="replace") if config.is_file() else ""
    title = run_dir.resolve().name
    body = "".join(
        [
            f'<h1>{escape(title)}</h1><div class="sub">{_summary(records)}</div>',
            html_cards(_headline(final, evals)),
            html_section("Training curves", "".join(html_figure(p, c) for p, c in made)),
            html_section("Final metrics", _metric_tables(final)),
            html_section("Tables", tables),
            html_section("Examples", _examples(run_dir, notes)),
            html_section("Other plots", "".join(html_figure(p, c) for p, c in extra)),
            html_section("Config", f"<pre>{escape(config_text)}</pre>" if config_text else ""),
            html_section("Notes", "".join(f'<p class="note">{escape(n)}</p>' for n in notes)),
        ]
    )
    out = run_dir / "report.html"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html_document(title, body), encoding="utf-8")
    os.replace(tmp, out)  # a reader never sees a half-written report
    return out
