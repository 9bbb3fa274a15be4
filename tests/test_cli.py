"""The CLI end to end on tiny-clip, bad samples through a whole run, every shipped config, the demo."""

import json
from pathlib import Path

import pytest
import yaml

from mmtune.cli import main
from tests.test_data import make_bad_files

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_KEYS = {
    "zeroshot.top1",
    "zeroshot.top5",
    "zeroshot.mean_per_class_recall",
    "retrieval.i2t.R@1",
    "retrieval.i2t.R@5",
    "retrieval.i2t.R@10",
    "retrieval.t2i.R@1",
    "retrieval.t2i.R@5",
    "retrieval.t2i.R@10",
    "data.skipped",
    "train.samples_per_s",
    "train.seconds",
}


def _args(tmp_path, name, *extra):
    return [
        "train",
        "model.name=tiny-clip",
        f"output_dir={tmp_path}",
        f"name={name}",
        "data.batch_size=32",
        "train.max_steps=3",
        "train.progress=false",
        *extra,
    ]


def test_train_then_eval_through_the_cli(tmp_path, capsys):
    assert main(_args(tmp_path, "run", "train.eval_every=2", "train.max_steps=4")) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics.keys() >= EXPECTED_KEYS
    assert metrics["data.skipped"] == 0 and metrics["eval.split"] == "test"
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "report.html",
        "checkpoints/last/COMPLETE",
        "checkpoints/best/COMPLETE",
        "model/mmtune_model.json",
    ):
        assert (run / f).exists(), f
    kinds = [json.loads(x)["kind"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "train" in kinds and kinds.count("eval") == 2
    assert "parameters:" in capsys.readouterr().out
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--output", str(out)]) == 0
    again = json.loads(out.read_text())
    for k in ("zeroshot.top1", "retrieval.i2t.R@1", "retrieval.t2i.R@5"):
        assert again[k] == pytest.approx(metrics[k], abs=1e-9), k


def test_eval_of_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "no valid checkpoint at" in capsys.readouterr().err


def _pairs_with_bad_files(folder):
    from tests.conftest import write_image

    rows = []
    for i in range(40):
        name = f"g{i}.png"
        write_image(folder / name, color=(220, 20, 20) if i % 2 else (20, 20, 220))
        rows.append(f"{name},{'a red square' if i % 2 else 'a blue square'}")
    bad = make_bad_files(folder)
    rows += [f"{name},a broken picture" for name in bad]
    (folder / "pairs.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    return folder / "pairs.csv", bad


def test_run_with_bad_samples_skips_and_counts_each(tmp_path):
    """D1: a whole run over bad files: each skipped and counted by reason in metrics.json."""
    path, bad = _pairs_with_bad_files(tmp_path)
    args = _args(
        tmp_path, "bad", f"data.dataset={path}", "data.val_fraction=0.0", f"data.test={path}", "data.batch_size=8"
    )
    assert main(args) == 0
    m = json.loads((tmp_path / "bad" / "metrics.json").read_text())
    assert m["data.skipped"] == 2 * len(bad)  # counted in train and in test
    for reason in bad.values():
        assert m[f"data.skipped.{reason}"] == 2
    assert m["data.train"] == 40 and "retrieval.t2i.R@1" in m and "zeroshot.top1" not in m


def test_on_bad_sample_error_stops_naming_the_file(tmp_path, capsys):
    path, _ = _pairs_with_bad_files(tmp_path)
    args = _args(tmp_path, "stop", f"data.dataset={path}", "data.on_bad_sample=error")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmtune: error: bad image ") and "missing.jpg: missing" in err
    assert "Traceback" not in err


# Run configs name a task; the others (serve.yaml, index-*.yaml) are run by their own tests.
SHIPPED = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "task" in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("config", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_validates_and_contrastive_ones_run(config, tmp_path):
    from mmtune.config import load_config

    cfg = load_config(config)
    if cfg.task != "contrastive":
        pytest.skip(f"{config.name} is run by the tests of task {cfg.task!r}")
    args = [
        "train",
        "--config",
        str(config),
        f"output_dir={tmp_path}",
        "train.max_steps=2",
        "train.progress=false",
        "train.eval_every=0",
    ]
    assert main(args) == 0
    saved = yaml.safe_load((tmp_path / cfg.name / "config.yaml").read_text())
    assert saved["model"]["name"] == cfg.model.name and saved["train"]["max_steps"] == 2


@pytest.mark.slow
def test_demo_reaches_zero_shot_target(tmp_path, capsys):
    """The demo as shipped: zero-shot top-1 ≥ 0.95 on held-out digits with unseen templates."""
    assert main(["demo", f"output_dir={tmp_path}", "train.progress=false"]) == 0
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert m["zeroshot.top1"] >= 0.95, m
    assert m["eval.split"] == "test" and m["data.test"] == 360
    assert "report:" in capsys.readouterr().out
