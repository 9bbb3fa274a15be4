"""`mmtune compare RUN…`: any runs side by side — the config keys that differ, then the figures."""

from __future__ import annotations

import csv
import fnmatch
import io
import json
from pathlib import Path

import yaml

from mmtune.errors import UserError

SKIP_KEYS = ("name", "output_dir")  # differ between every pair of runs by construction


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare runs: config differences and metrics, one table")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or a folder of runs")
    p.add_argument("-o", "--output", help="write the table to FILE.md, FILE.csv or FILE.json")
    p.add_argument("--metrics", default="*", help="fnmatch patterns of figures, comma-separated")
    p.set_defaults(func=cmd_compare)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} → {"train.lr": 1}; lists stay values."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_folders(paths: list[str]) -> list[Path]:
    """The run folders named, a folder of runs (a sweep) expanded to the runs inside it."""
    out = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            out.append(p)
            continue
        inside = sorted(q for q in p.glob("*") if (q / "config.yaml").is_file())
        if not inside:
            raise UserError(f"{p}: not a run folder (no config.yaml) and holds no runs")
        out += inside
    return out


def read_run(run: Path) -> tuple[dict, dict, str]:
    """A run's flat config, its figures, and whether it finished or stopped partway."""
    from mmtune.report import read_jsonl

    config = flatten(yaml.safe_load((run / "config.yaml").read_text()) or {})
    final = run / "metrics.json"
    if final.is_file():
        metrics = json.loads(final.read_text())
        split = metrics.get("eval.split")  # trials end on val, runs made by hand often on test
        return config, metrics, f"finished ({split})" if split else "finished"
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "eval"]
    if not evals:
        return config, {}, "no evaluation"
    last = {k: v for k, v in evals[-1].items() if k not in ("kind", "epoch", "time")}
    return config, last, f"stopped at step {last.pop('step', '?')} (last val)"


def table(runs: list[Path], patterns: list[str]) -> tuple[list[str], list[list]]:
    """Columns and rows: run, status, the differing config keys, then the chosen figures."""
    read = [read_run(r) for r in runs]
    keys = list(dict.fromkeys(k for c, _, _ in read for k in c))
    differ = [k for k in keys if k not in SKIP_KEYS and len({_key(c.get(k)) for c, _, _ in read}) > 1]
    figures = list(dict.fromkeys(k for _, m, _ in read for k, v in m.items() if _figure(k, v, patterns)))
    columns = ["run", "status", *differ, *figures]
    rows = [
        [str(r), s, *(c.get(k) for k in differ), *(m.get(k) for k in figures)]
        for r, (c, m, s) in zip(runs, read, strict=True)
    ]
    return columns, rows


def _key(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _figure(key: str, value, patterns: list[str]) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and any(fnmatch.fnmatchcase(key, p) for p in patterns)


def render(columns: list[str], rows: list[list], fmt: str) -> str:
    """The table as markdown, csv or json (a list of objects)."""
    if fmt == "json":
        return json.dumps([dict(zip(columns, r, strict=True)) for r in rows], indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(columns)
        w.writerows(rows)
        return buf.getvalue()
    cell = [[_cell(v) for v in r] for r in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cell]) + "\n"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "\\|")


def cmd_compare(args, extra) -> int:
    if extra:
        raise UserError(f"compare takes run folders and options, not {extra[0]!r}")
    fmt = "md"
    if args.output:
        fmt = Path(args.output).suffix.lstrip(".").lower()
        if fmt not in ("md", "csv", "json"):
            raise UserError(f"-o {args.output}: write FILE.md, FILE.csv or FILE.json")
    columns, rows = table(run_folders(args.runs), [p.strip() for p in args.metrics.split(",")])
    text = render(columns, rows, fmt)
    if args.output:
        Path(args.output).write_text(text)
        print(f"{len(rows)} runs compared → {args.output}")
    else:
        print(text, end="")
    return 0
