"""Tests for mmtune.report: tolerant JSONL reading and the self-contained HTML report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from mmtune.errors import UserError
from mmtune.report import format_value, read_jsonl, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = "data:image/png;base64,"

TRAIN_EVAL_LINES = [
    {"kind": "train", "step": 10, "epoch": 0.5, "time": 3.2, "loss": 1.9, "lr": 0.001},
    {"kind": "train", "step": 20, "epoch": 1.0, "time": 6.1, "loss": None, "lr": 0.002},
    {
        "kind": "train",
        "step": 30,
        "epoch": 1.5,
        "time": 9.0,
        "loss": 1.2,
        "loss.clip": 0.9,
        "lr": 0.002,
        "grad_norm": 3.4,
        "samples_per_s": 410.0,
    },
    {"kind": "eval", "step": 30, "epoch": 1.5, "time": 9.5, "zeroshot.top1": 0.71, "retrieval.i2t.R@1": 0.3},
    {"kind": "eval", "step": 50, "epoch": 2.0, "time": 9.9, "zeroshot.top1": 0.81, "retrieval.i2t.R@1": None},
]


def _assert_png(path: Path) -> None:
    """The file is a readable PNG (decoded by PIL when it is installed)."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as img:
        img.verify()


def _make_run(root: Path) -> Path:
    """A run folder with every input the report reads, including awkward ones."""
    run = root / "run-<7>"
    run.mkdir()
    lines = [json.dumps(rec) for rec in TRAIN_EVAL_LINES]
    truncated = '{"kind": "train", "step": 60, "lo'  # killed mid-write
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + truncated, encoding="utf-8")
    final = {"zeroshot.top1": 0.971234, "data.skipped": 3, "train.seconds": 41.2, "nan": None}
    (run / "metrics.json").write_text(json.dumps(final), encoding="utf-8")
    (run / "config.yaml").write_text("name: <script>alert(1)</script>\nlr: 1e-3\n")
    (run / "tables").mkdir()
    table = {"title": "Per-class <acc>", "columns": ["class", "top1"], "rows": [["cat", 0.5], ["dog&co", 1]]}
    (run / "tables" / "x.json").write_text(json.dumps(table), encoding="utf-8")
    (run / "tables" / "broken.json").write_text("{not json", encoding="utf-8")
    (run / "plots").mkdir()
    fig = Figure(figsize=(1, 1), dpi=20)
    fig.add_subplot().imshow([[0, 1], [1, 0]])
    fig.savefig(run / "plots" / "confusion_matrix.png")
    return run


def test_read_jsonl_skips_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n{"b": null}\n{"c": 3', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"b": None}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3, "3"),
        (0.971234, "0.9712"),
        (41.2, "41.2"),
        (41234.5, "41,234"),
        (None, "NaN"),
        (True, "true"),
        ("a", "a"),
        (1e-7, "1e-07"),
    ],
)
def test_fmt(value: object, text: str) -> None:
    assert format_value(value) == text


def test_full_report(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    out = write_report(run)
    assert out == run / "report.html"
    html = out.read_text(encoding="utf-8")

    made = ["train_loss.png", "lr.png", "eval.png"]
    for name in made + ["confusion_matrix.png"]:
        _assert_png(run / "plots" / name)
    assert html.count(DATA_URI) == len(made) + 1
    assert "<figcaption>confusion_matrix</figcaption>" in html

    assert "<title>run-&lt;7&gt;</title>" in html
    assert "<script>" not in html
    assert "name: &lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Per-class &lt;acc&gt;" in html
    assert "<td>cat</td>" in html and "<td>dog&amp;co</td>" in html
    assert "<td class=num>0.5</td>" in html
    assert "broken.json" in html  # the bad table is reported, not fatal

    headline = html.index('<div class="v">0.9712</div>')
    assert headline < html.index("<h2>")  # headline numbers come first
    assert "<h3>data</h3>" in html and "<td>skipped</td><td class=num>3</td>" in html
    assert "<td>seconds</td><td class=num>41.2</td>" in html


def test_rerun_does_not_embed_own_plots_twice(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    write_report(run)
    html = write_report(run).read_text(encoding="utf-8")
    assert html.count(DATA_URI) == 4


def test_metrics_json_only(tmp_path: Path) -> None:
    run = tmp_path / "eval-only"
    run.mkdir()
    (run / "metrics.json").write_text('{"zeroshot.top1": 0.5}', encoding="utf-8")
    (run / "metrics.jsonl").write_text("", encoding="utf-8")
    html = write_report(run).read_text(encoding="utf-8")
    assert DATA_URI not in html
    assert not list(run.glob("plots/*.png"))
    assert '<div class="v">0.5</div>' in html


def test_eval_only_curves(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(TRAIN_EVAL_LINES[-1]) + "\n")
    html = write_report(run).read_text(encoding="utf-8")
    assert html.count(DATA_URI) == 1
    _assert_png(run / "plots" / "eval.png")
    assert not (run / "plots" / "train_loss.png").exists()
    assert '<div class="v">0.81</div>' in html  # headline falls back to the last eval


def test_missing_run_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        write_report(tmp_path / "nope")
