"""Run folders written before runs recorded their task load; `mmtune runs upgrade` records it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmtune import api
from mmtune.cli import main
from mmtune.config import load_config
from mmtune.errors import CheckpointError
from mmtune.runs import open_run

ROOT = Path(__file__).resolve().parents[1]


def _old_layout(run: Path) -> None:
    """Rewrite a run's model spec as mmtune wrote it before the task contract: the VQ model's
    spec under `wrap` with the import path of its builder, no `task`."""
    f = run / "model" / "mmtune_model.json"
    spec = json.loads(f.read_text())
    spec["wrap"] = {"builder": "mmtune.models.vq:rebuild", "spec": spec.pop("vq")}
    del spec["task"]
    f.write_text(json.dumps(spec))


def test_old_run_folders_load_and_old_model_folders_upgrade(tmp_path, capsys):
    cfg = load_config(ROOT / "configs" / "tiny" / "vq-autoencoder.yaml", {"output_dir": str(tmp_path), "name": "vq"})
    api.train(cfg)
    task, model = open_run(cfg.run_dir)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(px)[0]
    _old_layout(cfg.run_dir)
    task, model = open_run(cfg.run_dir)  # config.yaml names the task; the spec is read from `wrap`
    with torch.no_grad():
        torch.testing.assert_close(model(px)[0], want, rtol=0, atol=0)
    (cfg.run_dir / "config.yaml").unlink()  # now like an exported model folder of that time
    task, model = open_run(cfg.run_dir)  # the task is read from the spec's layout
    assert task.name == "vq-autoencoder"
    assert main(["runs", "upgrade", str(cfg.run_dir)]) == 0
    assert "task vq-autoencoder" in capsys.readouterr().out
    assert json.loads((cfg.run_dir / "model" / "mmtune_model.json").read_text())["task"] == "vq-autoencoder"
    task, model = open_run(cfg.run_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(px)[0], want, rtol=0, atol=0)


def test_a_run_of_another_task_is_refused_by_name(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny" / "vq-autoencoder.yaml", {"output_dir": str(tmp_path), "name": "vq"})
    api.train(cfg)
    other = load_config(ROOT / "configs" / "tiny" / "contrastive.yaml")
    with pytest.raises(CheckpointError, match="trained by task vq-autoencoder, not contrastive"):
        open_run(cfg.run_dir, other)
