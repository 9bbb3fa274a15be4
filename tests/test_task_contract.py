"""The task contract, checked on every registered task from its shipped `configs/tiny/<task>.yaml`.

For each task: build → one optimizer step through the engine → save → reload the run through
`open_run` (the run's own task rebuilds the model) → the reloaded model predicts exactly what the
trained one did → `evaluate` reports the task's declared selection metric. A task registered
without a tiny config fails here, so every new task is covered by registering it.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmtune import api
from mmtune.config import load_config, save_config
from mmtune.tasks import Context, Evaluation, Task, get_task, task_names

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs by task name, trained on demand (a config may start from another task's run)."""
    return {"_dir": tmp_path_factory.mktemp("contract")}


def _requires(name: str) -> list[str]:
    text = (TINY / f"{name}.yaml").read_text()
    return [t for t in task_names() if "{runs}/" + t + '"' in text]


def _config(name: str, runs: dict):
    tree = yaml.safe_load((TINY / f"{name}.yaml").read_text().replace("{runs}", str(runs["_dir"])))
    tree.update(output_dir=str(runs["_dir"]), name=name)
    path = runs["_dir"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_config(path)


def _train(name: str, runs: dict):
    """(task, trained model, records) of a one-step run written to runs/<name>."""
    for dep in _requires(name):
        if dep not in runs:
            runs[dep] = _train(dep, runs)
    return _fit(_config(name, runs))


def _fit(cfg):
    from mmtune.engine import Trainer, make_accelerator
    from mmtune.runs import record_task

    name = cfg.task
    api.set_seed(cfg.seed)
    splits = api.build_data(cfg)
    acc = make_accelerator(cfg, cfg.run_dir)
    task = get_task(name)(Context(cfg, splits, acc.device))
    model = task.build()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    task.save(model, cfg.run_dir / "model")
    record_task(cfg.run_dir / "model", name)
    trainer = Trainer(cfg, task, model, acc, (splits.train, splits.val), cfg.run_dir)
    assert trainer.fit().step == cfg.train.max_steps
    return task, model.eval(), (splits.val or splits.test)[:64]


def _plain(x):
    """Outputs made comparable: images → arrays, base64 PNGs → decoded pixels, floats rounded."""
    if isinstance(x, Image.Image):
        return np.asarray(x).tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, float):
        return round(x, 5)
    if isinstance(x, str) and len(x) > 200:  # a base64 PNG
        import io

        return np.asarray(Image.open(io.BytesIO(base64.b64decode(x)))).tolist()
    return x


@pytest.mark.slow
@pytest.mark.parametrize("name", task_names())
def test_task_contract(name, runs):
    cls = get_task(name)
    assert issubclass(cls, Task) and cls.name == name, "a registered task subclasses Task"
    assert (TINY / f"{name}.yaml").is_file(), f"task {name} ships no configs/tiny/{name}.yaml"
    if name not in runs:
        runs[name] = _train(name, runs)
    _check(*runs[name])


def test_the_contributing_example_task_needs_no_other_change(tmp_path, monkeypatch):
    """CONTRIBUTING.md's whole example task, taken from the file, registered from outside the
    package: it trains, saves, reloads, predicts and evaluates through the unchanged program."""
    import re

    from mmtune import tasks

    text = (ROOT / "CONTRIBUTING.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "rotation_example.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(tasks._REGISTRY, "rotation", "rotation_example:RotationTask")
    tree = {
        "task": "rotation",
        "output_dir": str(tmp_path),
        "name": "rot",
        "model": {"name": "tiny-clip"},
        "data": {"dataset": "digits", "batch_size": 8},
        "train": {"max_steps": 2, "progress": False},
    }
    (tmp_path / "rot.yaml").write_text(yaml.safe_dump(tree))
    _check(*_fit(load_config(tmp_path / "rot.yaml")))


def _check(task, model, records):
    """Evaluate reports the declared metric; the reloaded run predicts what the trained model did."""
    from mmtune.runs import open_run

    cls = type(task)
    with torch.no_grad():
        evaluation = task.evaluate(model, records)
    assert isinstance(evaluation, Evaluation)
    assert cls.metric in evaluation.metrics, f"{cls.name} does not report its metric {cls.metric}"
    inputs = task.predict_inputs(records[:2])
    assert bool(inputs) == ("predict" in cls.routes), "a task serving predict gives inputs for it"
    if not inputs:
        return
    torch.manual_seed(0)
    with torch.no_grad():
        want = _plain(task.predict(model, inputs))
    reloaded_task, reloaded = open_run(task.cfg.run_dir)
    assert type(reloaded_task) is cls
    torch.manual_seed(0)
    with torch.no_grad():
        got = _plain(reloaded_task.predict(reloaded, inputs))
    assert got == want
    assert all(isinstance(task.format_prediction(o), str) for o in want)
