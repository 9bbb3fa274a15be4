"""`mmtune eval --benchmark` and `--suite`: zero-shot benchmarks for any model in CLIP_benchmark's
keys and layout, suites of them into one table with the difference from a baseline model.

Benchmark layouts written here, as CLIP_benchmark's `wds/` datasets are laid out:

    classification: DIR/classnames.txt, DIR/zeroshot_classification_templates.txt (`{c}`),
                    DIR/test/nshards.txt, DIR/test/0.tar … (`s0000000.png` + `s0000000.cls`)
                    — written by `mmtune data benchmark`
    retrieval:      DIR/test/nshards.txt, DIR/test/0.tar … (`s0000000.jpg` + `s0000000.txt`,
                    one caption a line; no class names) — written by hand below
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmtune import api
from mmtune.cli import main
from mmtune.cli.common import configs_dir
from mmtune.config import load_config
from mmtune.data.builtin.digits import CLASSES, digits_splits

TINY = str(configs_dir() / "tiny" / "contrastive.yaml")


def _train(out: Path, name: str, steps: int) -> Path:
    over = {"output_dir": str(out), "name": name, "train.max_steps": steps, "train.lr": 5e-3, "data.batch_size": 32}
    api.train(load_config(TINY, over))
    return out / name


def _add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _image_folder(folder: Path, records) -> None:
    """An ImageFolder: one sub-folder per class name, PNG files."""
    for i, rec in enumerate(records):
        (folder / CLASSES[rec.label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rec.image).save(folder / CLASSES[rec.label] / f"{i:04d}.png")


def _retrieval_benchmark(caption_folder: Path, bench: Path, records, per_shard: int = 25) -> None:
    """The same JPEG bytes twice: a caption folder (KEY.jpg + KEY.txt) and CLIP_benchmark's
    retrieval layout (test/nshards.txt, test/N.tar of sNNNNNNN.jpg + sNNNNNNN.txt)."""
    caption_folder.mkdir(parents=True)
    (bench / "test").mkdir(parents=True)
    shards = 0
    for start in range(0, len(records), per_shard):
        with tarfile.open(bench / "test" / f"{shards}.tar", "w") as tar:
            for i, rec in enumerate(records[start : start + per_shard], start):
                buf = io.BytesIO()
                Image.fromarray(rec.image).convert("RGB").resize((16, 16)).save(buf, "JPEG", quality=90)
                text = "\n".join(f"{c} sample {i}." for c in rec.captions[:2])  # unique, as in COCO
                (caption_folder / f"{i:04d}.jpg").write_bytes(buf.getvalue())
                (caption_folder / f"{i:04d}.txt").write_text(text)
                _add(tar, f"s{i:07d}.jpg", buf.getvalue())
                _add(tar, f"s{i:07d}.txt", text.encode())
        shards += 1
    (bench / "test" / "nshards.txt").write_text(f"{shards}\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two runs of the tiny contrastive config (3 and 40 steps) and three benchmarks, each also
    laid out as plain data mmtune's `eval` reads."""
    root = tmp_path_factory.mktemp("bench")
    runs = {"before": _train(root, "before", 3), "after": _train(root, "after", 40)}
    test = digits_splits(0)["test"]
    _image_folder(root / "digits-folder", test[:150])
    assert (
        main(
            [
                "data",
                "benchmark",
                str(root / "digits-folder"),
                "-o",
                str(root / "digits-wds"),
                "--samples-per-shard",
                "40",
                "data.format=imagefolder",
                f"data.test={root / 'digits-folder'}",
            ]
        )
        == 0
    )
    _retrieval_benchmark(root / "captions", root / "captions-wds", test[150:250])
    return root, runs


def _cli_eval(run: Path, out: Path, *overrides: str) -> dict:
    assert main(["eval", "--checkpoint", str(run), "-o", str(out), *overrides]) == 0
    return json.loads(out.read_text())


def test_suite_equals_eval_of_each_model_on_each_benchmark_read_as_folders(world, tmp_path, capsys):
    root, runs = world
    suite = {
        "baseline": "before",
        "models": [{"name": n, "model": str(p)} for n, p in runs.items()],
        "benchmarks": [
            {"name": "digits-wds", "path": str(root / "digits-wds")},
            {"name": "captions", "path": str(root / "captions-wds")},
            {"name": "digits", "path": "digits", "split": "test"},
        ],
        "overrides": {"data.eval_batch_size": 64},  # the runs' own
    }
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(json.dumps(suite))  # JSON is YAML
    out = tmp_path / "suite-out"
    assert main(["eval", "--suite", str(suite_file), "-o", str(out)]) == 0
    capsys.readouterr()
    table = json.loads((out / "table.json").read_text())
    folder = root / "digits-folder"
    for name, run in runs.items():
        results = {
            b: json.loads((out / "results" / name / f"{b}.json").read_text())
            for b in ("digits-wds", "captions", "digits")
        }
        ref = {
            "digits-wds": _cli_eval(
                run, tmp_path / "a.json", f"data.dataset={folder}", f"data.test={folder}", "data.format=imagefolder"
            ),
            "captions": _cli_eval(
                run, tmp_path / "b.json", f"data.dataset={root / 'captions'}", f"data.test={root / 'captions'}"
            ),
            "digits": _cli_eval(run, tmp_path / "c.json"),  # the run's own config: digits, test split
        }
        for bench, result in results.items():
            assert set(result) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
            m = result["metrics"]
            prefix = "zeroshot." if result["task"] == "zeroshot_classification" else "retrieval."
            own = {k: v for k, v in ref[bench].items() if k.startswith(prefix)}
            assert own and {k: m[k] for k in own} == own, (name, bench)  # exactly equal
        assert results["digits-wds"]["task"] == results["digits"]["task"] == "zeroshot_classification"
        assert results["captions"]["task"] == "zeroshot_retrieval"
        zs = results["digits-wds"]["metrics"]
        assert (zs["acc1"], zs["acc5"], zs["mean_per_class_recall"]) == (
            zs["zeroshot.top1"],
            zs["zeroshot.top5"],
            zs["zeroshot.mean_per_class_recall"],
        )
        rt = results["captions"]["metrics"]
        for k in (1, 5, 10):  # a caption finds its image = image retrieval (t2i); the reverse = text retrieval
            assert rt[f"image_retrieval_recall@{k}"] == rt[f"retrieval.t2i.R@{k}"]
            assert rt[f"text_retrieval_recall@{k}"] == rt[f"retrieval.i2t.R@{k}"]
        for bench in results:  # the table holds the same figures
            for row in (r for r in table["rows"] if r["benchmark"] == bench):
                assert row["values"][name] == results[bench]["metrics"][row["metric"]]
    assert results["digits-wds"]["metrics"]["data.samples"] == 150
    _check_table_files(out, table)
    assert any(abs(v) > 0 for r in table["rows"] for v in r["diff"].values())  # the runs differ


def _check_table_files(out: Path, table: dict) -> None:
    """table.csv and table.md say what table.json says; the diff is value − baseline."""
    rows = list(csv.DictReader((out / "table.csv").open()))
    md = [line.strip("|").split("|") for line in (out / "table.md").read_text().splitlines()[2:]]
    base = table["baseline"]
    assert len(rows) == len(md) == len(table["rows"]) > 0
    for row, csv_row, md_row in zip(table["rows"], rows, md, strict=True):
        md_row = [c.strip() for c in md_row]
        assert [csv_row["benchmark"], csv_row["metric"]] == [row["benchmark"], row["metric"]] == [md_row[0], md_row[2]]
        for i, model in enumerate(table["models"]):
            assert float(csv_row[model]) == row["values"][model]
            assert md_row[3 + i] == f"{row['values'][model]:.4f}"
        for model, d in row["diff"].items():
            assert d == pytest.approx(row["values"][model] - row["values"][base], abs=1e-12)
            assert float(csv_row[f"Δ {model} vs {base}"]) == d
    svg = (out / "table.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<title>") == len(table["rows"]) * len(table["models"])


def test_retrieval_recall_is_clip_benchmarks_definition(world, tmp_path):
    """image_retrieval_recall@K checked against CLIP_benchmark's definition worked out here on the
    model's own embeddings: per caption, is its image among the K best-scoring images."""
    from mmtune.runs import load_run

    root, runs = world
    out = tmp_path / "r.json"
    assert main(["eval", "--benchmark", str(root / "captions-wds"), "--model", str(runs["after"]), "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot_retrieval" and result["dataset"] == "captions-wds"
    model, proc = load_run(runs["after"])
    paths = sorted((root / "captions").glob("*.jpg"))
    with torch.no_grad():
        img = model.encode_image(proc.images([Image.open(p).convert("RGB") for p in paths]))
        texts = [(i, c) for i, p in enumerate(paths) for c in p.with_suffix(".txt").read_text().splitlines()]
        txt = model.encode_text(**proc.tokenize([c for _, c in texts]))
    scores = (txt @ img.T).numpy()  # (texts, images)
    owner = np.array([i for i, _ in texts])
    for k in (1, 5):
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        expected = float(np.mean([owner[t] in top[t] for t in range(len(texts))]))
        assert result["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(expected, abs=1.5 / len(texts))


def test_shipped_suite_runs(world, tmp_path, monkeypatch, capsys):
    """configs/suite-tiny.yaml, from a folder holding what it names: the tiny run and the
    CLIP_benchmark copy of digits."""
    root, runs = world
    monkeypatch.chdir(tmp_path)
    shutil.copytree(runs["after"], tmp_path / "runs" / "tiny-contrastive")
    assert main(["data", "benchmark", "digits", "-o", "benchmarks/digits"]) == 0
    assert main(["eval", "--suite", str(configs_dir() / "suite-tiny.yaml")]) == 0
    shown = capsys.readouterr().out
    table = json.loads((tmp_path / "runs" / "suite-suite-tiny" / "table.json").read_text())
    assert table["baseline"] == "tiny-clip" and len(table["models"]) == 2
    assert {r["benchmark"] for r in table["rows"]} == {"digits", "digits-wds", "digits-retrieval"}
    assert "| digits-wds | zeroshot_classification | acc1 |" in shown
    wds = {r["metric"]: r for r in table["rows"] if r["benchmark"] == "digits-wds"}
    same = {r["metric"]: r for r in table["rows"] if r["benchmark"] == "digits"}
    assert wds["acc1"]["values"] == same["acc1"]["values"]  # the same test split, read from shards


def test_bad_benchmarks_are_counted_or_one_line(world, tmp_path, capsys):
    """A corrupt image and an out-of-range or non-numeric .cls are skipped and counted by reason;
    a missing split, a suite naming an unknown baseline, or no model is one line."""
    root, runs = world
    bench = tmp_path / "bad"
    shutil.copytree(root / "digits-wds", bench)
    with tarfile.open(bench / "test" / "0.tar") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(bench / "test" / "0.tar", "w") as tar:
        for name, data in members:
            if name == "s0000001.png":
                data = data[: len(data) // 2]  # cut inside the pixel data
            elif name == "s0000002.cls":
                data = b"12"
            elif name == "s0000003.cls":
                data = b"two"
            _add(tar, name, data)
    out = tmp_path / "bad.json"
    assert main(["eval", "--benchmark", str(bench), "--model", str(runs["before"]), "-o", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["data.samples"] == 147 and m["data.skipped"] == 3
    assert m["data.skipped.truncated"] == 1 and m["data.skipped.bad_cls"] == 2
    capsys.readouterr()
    assert main(["eval", "--benchmark", str(bench), "--model", "tiny-clip", "--split", "val"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mmtune: error: {bench}: no split 'val' (val/nshards.txt missing; splits here: ['test'])"
    suite = tmp_path / "s.yaml"
    suite.write_text("models: [tiny-clip]\nbenchmarks: [digits]\nbaseline: other\n")
    assert main(["eval", "--suite", str(suite)]) == 2
    assert "baseline 'other' is not one of the models ['tiny-clip']" in capsys.readouterr().err
    assert main(["eval", "--benchmark", "digits"]) == 2
    assert "needs --model" in capsys.readouterr().err
