"""Shared fixtures: tiny configs, generated image files, quiet transformers."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmtune  # noqa: F401  (first: its OpenMP wait policy must be set before torch loads)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def tiny_overrides(tmp_path, **extra) -> dict:
    """Overrides for a seconds-long run of tiny-clip on digits in tmp_path."""
    base = {
        "model.name": "tiny-clip",
        "output_dir": str(tmp_path),
        "name": "run",
        "data.batch_size": 32,
        "data.eval_batch_size": 128,
        "train.max_steps": 4,
        "train.warmup_steps": 1,
        "train.progress": False,
        "train.log_every": 1,
    }
    base.update(extra)
    return base


@pytest.fixture
def tiny_cfg(tmp_path):
    from mmtune.config import load_config

    def make(**extra):
        return load_config(None, tiny_overrides(tmp_path, **extra))

    return make


def one_line_error(capsys, *needles) -> str:
    """The CLI's stderr: one `mmtune: error:` line (no traceback) holding every needle."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmtune: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def write_image(path, size=(20, 20), color=(200, 30, 30), fmt=None) -> str:
    # crc32, not hash(): str hashes change from process to process, the images must not
    rng = np.random.default_rng(zlib.crc32(str(Path(path).name).encode()))
    arr = np.clip(rng.normal(color, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return str(path)


@pytest.fixture
def pairs_folder(tmp_path):
    """A folder of 12 small JPEG/PNG images of two colours, with captions."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = []
    for i in range(12):
        red = i % 2 == 0
        name = f"img{i}.{'jpg' if i % 3 else 'png'}"
        write_image(folder / name, color=(220, 20, 20) if red else (20, 20, 220))
        rows.append((name, "a red square" if red else "a blue square", "red" if red else "blue"))
    return folder, rows
