"""`mmtune compare`: config differences and figures of any runs, as markdown, CSV or JSON."""

from __future__ import annotations

import json

import yaml

from mmtune.cli import main


def _run(folder, lr, r, metrics=None, evals=()):
    folder.mkdir(parents=True)
    cfg = {
        "name": folder.name,
        "seed": 0,
        "train": {"lr": lr, "epochs": 2},
        "options": {"lora_r": r},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    lines = [json.dumps({"kind": "eval", "step": s, "epoch": 0.5, "top1": v}) for s, v in evals]
    (folder / "metrics.jsonl").write_text("".join(x + "\n" for x in lines))


def test_compare_lists_differences_and_figures(tmp_path, capsys):
    _run(tmp_path / "a", 1e-3, 4, {"top1": 0.5, "eval.split": "test", "data.train": 10})
    _run(tmp_path / "b", 1e-3, 8, {"top1": 0.75, "eval.split": "test", "data.train": 10})
    _run(tmp_path / "sweep" / "trial-0000", 2e-3, 8, evals=[(2, 0.25), (4, 0.5)])
    out = tmp_path / "t.json"
    assert (
        main(
            [
                "compare",
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                str(tmp_path / "sweep"),
                "-o",
                str(out),
                "--metrics",
                "top*",
            ]
        )
        == 0
    )
    capsys.readouterr()
    rows = json.loads(out.read_text())
    assert [set(r) for r in rows] == [{"run", "status", "train.lr", "options.lora_r", "top1"}] * 3
    assert [(r["train.lr"], r["options.lora_r"], r["top1"]) for r in rows] == [
        (1e-3, 4, 0.5),
        (1e-3, 8, 0.75),
        (2e-3, 8, 0.5),
    ]
    assert rows[2]["status"] == "stopped at step 4 (last val)"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0] == "| run | status | options.lora_r | top1 | data.train |"
    assert md[3].endswith("| finished (test) | 8 | 0.75 | 10 |")


def test_compare_names_a_folder_without_runs(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path) in err and len(err.splitlines()) == 1
