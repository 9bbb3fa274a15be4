"""`mmtune sweep`: space files, pruning at an evaluation, resume after SIGKILL, best.yaml, workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmtune.cli import main
from tests.conftest import tiny_overrides

SPACE = {
    "train.lr": {"loguniform": [1.0e-4, 1.0e-2]},
    "train.weight_decay": {"uniform": [0.0, 0.3]},
}


def _args(tmp_path, space: dict, *flags: str, **extra) -> list[str]:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    over = tiny_overrides(tmp_path, **{"train.eval_every": 2, "eval.metric": "zeroshot.top1"})
    over.update(extra)
    cfg = Path(__file__).parents[1] / "configs" / "demo.yaml"
    return ["sweep", "-c", str(cfg), "--space", str(path), *flags] + [f"{k}={v}" for k, v in over.items()]


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"train.lrr": {"uniform": [0.1, 0.2]}}, "unknown config key 'train.lrr'"),
        ({"options.nope": {"choice": [1]}}, "unknown config key 'options.nope'"),
        ({"train.lr": {"normal": [0, 1]}}, "is not a distribution"),
        ({"train.lr": {"uniform": [0.2, 0.1]}}, "empty range"),
        ({"train.lr": {"loguniform": [0.0, 0.1]}}, "positive low bound"),
        ({"train.lr": {"choice": [-1.0]}}, "config key 'train.lr'"),
        ({"train.lr": 1e-3}, "no key to search"),
    ],
)
def test_bad_space_fails_in_one_line(tmp_path, capsys, space, expected):
    task = "contrastive"  # the demo config's own task; options.* keys are checked against its options
    assert main(_args(tmp_path, space, "--trials", "1", task=task)) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "space file" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # failed before any trial


def test_space_grid_and_bounds():
    from mmtune.sweep.space import parse_space

    space = parse_space({"a": {"int": [0, 3]}, "b": {"loguniform": [1e-4, 1e-2]}, "c": 5})
    grid = space.grid()
    assert grid["a"] == [0, 1, 2, 3]
    assert grid["b"] == pytest.approx([1e-4, 1e-3, 1e-2])
    assert space.fixed == {"c": 5}


def test_pruned_run_stops_at_that_evaluation(tiny_cfg):
    from mmtune import api
    from mmtune.engine import Pruned
    from mmtune.report import read_jsonl

    cfg = tiny_cfg(**{"train.max_steps": 6, "train.eval_every": 2})
    seen = []

    def on_eval(step, metrics):
        seen.append(step)
        if step == 4:
            raise Pruned("enough")

    with pytest.raises(Pruned):
        api.train(cfg, on_eval=on_eval)
    lines = read_jsonl(cfg.run_dir / "metrics.jsonl")
    assert seen == [2, 4]
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [2, 4]  # partial curve kept
    assert max(r["step"] for r in lines) == 4 and not (cfg.run_dir / "metrics.json").exists()


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    assert main(_args(tmp, SPACE, "--trials", "3", "--name", "s", "--sampler", "random")) == 0
    return tmp / "s"


def test_best_yaml_reproduces_the_best_validation_figure(finished_sweep, tmp_path):
    from mmtune import api
    from mmtune.config import load_config

    summary = json.loads((finished_sweep / "summary.json").read_text())
    best_row = [r for r in _csv(finished_sweep) if r["trial"] == str(summary["best_trial"])][0]
    assert float(best_row["value"]) == pytest.approx(summary["best_value"])
    assert max(float(r["value"]) for r in _csv(finished_sweep)) == summary["best_value"]
    cfg = load_config(finished_sweep / "best.yaml", {"output_dir": str(tmp_path)})
    metrics = api.train(cfg)
    assert metrics["eval.split"] == "val"
    assert metrics["zeroshot.top1"] == pytest.approx(summary["best_value"], abs=1e-9)
    assert "zeroshot.top1" in summary["best_test"]
    assert (finished_sweep / "report.html").stat().st_size > 10_000


def _csv(folder: Path) -> list[dict]:
    import csv

    return list(csv.DictReader(open(folder / "trials.csv")))


def _trials(folder: Path, name: str) -> list:
    import optuna

    url = f"sqlite:///{folder / 'study.db'}"
    return optuna.load_study(study_name=name, storage=url).get_trials()


@pytest.mark.slow
def test_killed_sweep_resumes_without_repeating_trials(tmp_path):
    """X4: a real sweep process SIGKILLed during its second trial, then the same command again."""
    args = _args(tmp_path, SPACE, "--trials", "3", "--name", "k", "--pruner", "none", **{"train.max_steps": 8})
    env = {**os.environ, "MMTUNE_THREADS": "1"}
    cmd = [sys.executable, "-m", "mmtune.cli", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = tmp_path / "k" / "trial-0001" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (second.exists() and second.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "sweep ended before the kill"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-trial: trial 0 finished, trial 1 half-trained
    proc.wait()
    first = (tmp_path / "k" / "trial-0000" / "metrics.jsonl").read_text()
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    trials = _trials(tmp_path / "k", "k")
    states = {t.number: t.state.name for t in trials}
    assert states[0] == "COMPLETE" and states[1] == "FAIL"
    assert sum(s == "COMPLETE" for s in states.values()) == 3  # as many as an uninterrupted sweep
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].params == trials[1].params  # the interrupted point again
    assert (tmp_path / "k" / "trial-0000" / "metrics.jsonl").read_text() == first  # not re-run


@pytest.mark.distributed
@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path):
    """X5: --jobs 2 on one SQLite study: distinct trial numbers, two worker processes at once."""
    args = _args(tmp_path, SPACE, "--trials", "4", "--name", "j", "--jobs", "2")
    assert main(args) == 0
    trials = _trials(tmp_path / "j", "j")
    numbers = [t.number for t in trials]
    assert sorted(numbers) == [0, 1, 2, 3]
    runs = {t.user_attrs["run"] for t in trials}
    assert len(runs) == 4 and all((tmp_path / "j" / r / "metrics.json").exists() for r in runs)
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids
    a, b = ([t for t in trials if t.user_attrs["pid"] == p] for p in pids)
    # some trial of one worker ran while a trial of the other did: two trials at once
    assert any(x.datetime_start < y.datetime_complete and y.datetime_start < x.datetime_complete for x in a for y in b)


def test_shipped_space_file_checks_against_its_base_config():
    """configs/sweep-digits.yaml (what `make sweep-digits` searches) reads and checks cleanly
    against configs/classify-digits.yaml: three searched keys; a trial has the shipped budget."""
    from mmtune.sweep.space import Base, load_space

    root = Path(__file__).parents[1] / "configs"
    space = load_space(root / "sweep-digits.yaml", Base(str(root / "classify-digits.yaml"), {}))
    assert {p.key for p in space.params} == {"train.lr", "options.lora_r", "train.weight_decay"}
    assert space.fixed == {"options.method": "lora", "train.eval_every": 18}  # 20 epochs of 128, as shipped
