"""Rows of the reliability checklist (docs/reliability.md) with no natural home elsewhere.

Real files, real subprocesses killed with real signals, a real resource limit for a full disk;
each test names its row.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmtune import api
from mmtune.checkpoint import (
    clean_stale,
    is_complete,
    latest,
    read_meta,
    save_checkpoint,
    verify,
)
from mmtune.data import Record, screen
from mmtune.errors import CheckpointError
from tests.conftest import tiny_overrides
from tests.test_data import _bomb_png, make_bad_files
from tests.test_determinism import _trainer

# ---------------------------------------------------------------- checkpoints and resume


def test_r2_resumed_loader_continues_the_epoch_then_the_next_epoch_is_unchanged(tiny_cfg):
    """R2: stopped after batch k, a new Trainer (2 loader workers) yields batches k+1… of that
    epoch exactly, then the same next epoch as the uninterrupted run."""
    over = {"data.augment": True, "data.num_workers": 2, "data.batch_size": 128}
    straight, resumed = _trainer(tiny_cfg(**over)), _trainer(tiny_cfg(**over))
    full = list(straight._loader(epoch=0, start=0))
    k = 3
    rest = list(resumed._loader(epoch=0, start=k))
    assert len(full) > k + 1 and len(rest) == len(full) - k
    for a, b in zip(full[k:], rest, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["captions"] == b["captions"]
    nxt_a = next(iter(straight._loader(epoch=1, start=0)))
    nxt_b = next(iter(resumed._loader(epoch=1, start=0)))
    assert torch.equal(nxt_a["pixel_values"], nxt_b["pixel_values"])
    assert not torch.equal(nxt_a["pixel_values"], full[0]["pixel_values"])  # epochs differ


SLOW_SAVE = """
import sys, time, torch
from mmtune.checkpoint import save_checkpoint
target = sys.argv[1]
model = torch.nn.Linear(64, 64)
save_checkpoint(target, model, {"opt": torch.zeros(3)}, {"state": {"step": 1}})
real_save = torch.save
def stalled(*a, **k):  # the weights file is written; the process is killed in the next one
    real_save(*a, **k)
    print("mid-save", flush=True)
    time.sleep(120)
torch.save = stalled
with torch.no_grad():
    model.weight.add_(1)
save_checkpoint(target, model, {"opt": torch.ones(3)}, {"state": {"step": 2}})
"""


def test_r4_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """R4: SIGKILL in the middle of a save: the previous checkpoint is intact and chosen as
    latest, the partial one never is, and the next start removes its temp folder."""
    root = tmp_path / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, str(root / "last")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert proc.stdout.readline().strip() == "mid-save"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        assert proc.wait(30) == -signal.SIGKILL
    partial = list(root.glob(".tmp-last-*"))
    assert len(partial) == 1 and not is_complete(partial[0])
    assert (partial[0] / "model.safetensors").is_file()  # it really died mid-save
    assert latest(root) == root / "last"
    assert read_meta(root / "last") == {"state": {"step": 1}}
    old = load_file(str(root / "last" / "model.safetensors"))["weight"]
    new = load_file(str(partial[0] / "model.safetensors"))["weight"]
    assert verify(root / "last") and torch.allclose(old + 1, new)
    clean_stale(root)  # what `mmtune train` does first
    assert sorted(p.name for p in root.iterdir()) == ["last"]


def test_r5_truncated_file_is_named_and_resume_auto_falls_back(tmp_path, caplog):
    """R5: a truncated file → an error naming it; `--resume auto` takes the previous complete
    checkpoint, with a warning. R7: an explicit missing path is an error; `auto` in an empty run
    folder starts fresh (that is what `auto` is configured to mean)."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    model = torch.nn.Linear(40, 40)
    save_checkpoint(root / "best", model, {"o": torch.zeros(2)}, {"state": {"step": 2}})
    save_checkpoint(root / "last", model, {"o": torch.zeros(2)}, {"state": {"step": 4}})
    assert api._resume_target(run, "auto") == root / "last"
    weights = root / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"last/model\.safetensors.*truncated"):
        api._resume_target(run, str(run))
    with caplog.at_level(logging.WARNING, logger="mmtune.checkpoint"):
        assert api._resume_target(run, "auto") == root / "best"
    assert "model.safetensors" in caplog.text and "falling back to" in caplog.text
    (root / "best" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no valid checkpoint to resume"):
        api._resume_target(run, "auto")  # every one damaged: never a silent fresh start
    with pytest.raises(CheckpointError, match="no valid checkpoint at"):
        api._resume_target(run, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert api._resume_target(tmp_path / "empty", "auto") is None


def test_r6_full_disk_during_a_save_stops_the_run_with_the_error(tmp_path):
    """R6: files limited to 2 MB (RLIMIT_FSIZE, as a full disk refuses writes; the weights are
    4 MB): `mmtune train` fails with the OS error, leaves no checkpoint and reports no success.
    (A read-only folder: tests/test_engine.py::test_r6_read_only_folder_fails_loudly.)"""
    over = tiny_overrides(tmp_path, **{"train.max_steps": 2, "train.save_every": 1, "train.eval_every": 0})

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    run = subprocess.run(
        [sys.executable, "-m", "mmtune.cli", "train", *(f"{k}={v}" for k, v in over.items())],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
        env={**os.environ, "MMTUNE_THREADS": "1"},
    )
    assert run.returncode != 0
    assert "File too large" in run.stderr, run.stderr[-2000:]
    run_dir = tmp_path / "run"
    assert not is_complete(run_dir / "checkpoints" / "last")
    assert not (run_dir / "metrics.json").exists() and "report:" not in run.stdout
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the failed save cleaned up


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A real training run saving and evaluating at every one of its 4 steps."""
    from mmtune.config import load_config

    tmp = tmp_path_factory.mktemp("saves")
    over = tiny_overrides(tmp, **{"train.max_steps": 4, "train.save_every": 1, "train.eval_every": 1})
    api.train(load_config(None, over))
    return tmp / "run"


def test_r8_many_saves_keep_exactly_last_and_best(saved_run):
    """R8: after 4 saves with best tracking, exactly `last` + `best` remain (the engine keeps
    the last N = 1), both complete, nothing half-written. Only rank 0 writes and deletes: see
    tests/test_determinism.py::test_f1_torchrun_restart_resumes_to_the_same_weights."""
    root = saved_run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["best", "last"]
    assert all(verify(root / n) for n in ("best", "last"))
    assert read_meta(root / "last")["state"]["step"] == 4


def test_s2_every_file_written_is_safetensors_or_loads_weights_only(saved_run):
    """S2: weights are safetensors; every other torch file loads with weights_only=True."""
    files = [p for p in saved_run.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    pickled = [p for p in files if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle")]
    assert {p.parent.name for p in weights} >= {"last", "best"}
    for p in weights:
        assert load_file(str(p))
    assert pickled and all(p.name == "trainer_state.pt" for p in pickled)
    for p in pickled:
        state = torch.load(p, weights_only=True)
        assert set(state) >= {"optimizer", "scheduler", "rng"}


# ---------------------------------------------------------------- bad data

BOMB_MEMORY = """
import resource, sys
from mmtune.data.images import BadImage, load_image
for path in sys.argv[1:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_image(path)
        reason = "decoded"
    except BadImage as e:
        reason = e.reason
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(reason, (after - before) // 1024)
"""


def _decodable_bomb(path: Path, side: int) -> Path:
    """A real side × side RGB PNG of zeros: every row decodes (deflate shrinks it ~1000×)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * side)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_d2_png_declaring_a_huge_size_is_refused_from_its_header(tmp_path):
    """D2: PNGs declaring 8000×8000 pixels (over the 40 M limit, under Pillow's own bomb check)
    are refused as too_large from the header: a ~100-byte one, and a ~200 KB one that would
    really decode to 192 MB — peak memory grows < 40 MB. (20000×20000: tests/test_data.py.)"""
    tiny = _bomb_png(tmp_path / "tiny.png", 8000, 8000)
    real = _decodable_bomb(tmp_path / "real.png", 8000)
    assert tiny.stat().st_size < 1024 and real.stat().st_size < 400_000
    out = subprocess.run(
        [sys.executable, "-c", BOMB_MEMORY, str(real), str(tiny)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for line in out.splitlines():  # peak memory only grows: the real bomb is read first
        reason, grown_mb = line.split()
        assert reason == "too_large" and int(grown_mb) < 40, out
    assert len(out.splitlines()) == 2


def test_d4_captions_not_utf8_are_filtered_and_long_ones_truncated(tmp_path):
    """D4: a caption that was not UTF-8 is dropped and counted like empty ones; a 10,000-char
    caption is kept and truncated to the context length by the tokenizer."""
    from mmtune.data.formats import read_table
    from mmtune.models.load import preset
    from tests.conftest import write_image

    for i in range(4):
        write_image(tmp_path / f"{i}.png")
    long = "a long caption " * 700
    (tmp_path / "pairs.csv").write_bytes(
        b"image,caption\n0.png,a fine caption\n1.png,caf\xe9 au lait\n2.png,   \n3.png," + long.encode()
    )
    recs = read_table(str(tmp_path / "pairs.csv"), "csv").records
    kept, counts = screen(recs)
    assert [r.image.rsplit("/", 1)[-1] for r in kept] == ["0.png", "3.png"]
    assert dict(counts) == {"caption_not_utf8": 1, "empty_caption": 1}
    _, proc, _ = preset("tiny-clip")
    ids = proc.tokenize([kept[1].captions[0], "short"])["input_ids"]
    assert len(kept[1].captions[0]) > 10_000 and ids.shape[1] == proc.max_length


def test_d5_a_hundred_bad_samples_log_two_lines_and_never_sleep(tmp_path, caplog, monkeypatch):
    """D5: 100 bad images → the first skip logged, then one count; no sleeping between them."""
    bad = make_bad_files(tmp_path)
    names = list(bad)
    recs = [Record(image=str(tmp_path / names[i % len(names)]), captions=["x"]) for i in range(100)]
    recs.append(Record(image=np.zeros((8, 8), np.uint8), captions=["fine"]))

    def no_sleep(s):
        raise AssertionError("the bad-sample handler slept")

    monkeypatch.setattr(time, "sleep", no_sleep)
    with caplog.at_level(logging.DEBUG, logger="mmtune.data"):
        kept, counts = screen(recs)
    lines = [r for r in caplog.records if r.name == "mmtune.data"]
    assert len(kept) == 1 and sum(counts.values()) == 100
    assert len(lines) == 2, [r.getMessage() for r in lines]
    assert "further skips are counted" in lines[0].getMessage()
    assert "skipped 100 bad samples" in lines[1].getMessage()


# ---------------------------------------------------------------- the checklist itself

ROWS = [f"R{i}" for i in range(1, 10)] + [f"S{i}" for i in range(1, 6)]
ROWS += [f"D{i}" for i in range(1, 8)] + [f"V{i}" for i in range(1, 12)]
ROWS += ["F1", "F2", "X1", "X2", "X3", "X4", "X5"]
ROWS += ["D10"]


def _test_source(path: Path, name: str) -> str | None:
    """The text of `def name(…)` in the file at `path` (up to the next top-level line)."""
    m = re.search(rf"^def {name}\(.*?\n(?=\S)", path.read_text() + "\n#", re.M | re.S)
    return m.group(0) if m else None


def test_every_row_names_a_test_that_exists():
    """docs/reliability.md holds every row of the checklist; every test a row names exists, and
    one of them carries the row id in its name or docstring."""
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "reliability.md").read_text()
    rows = {m[1]: m[2] for m in re.finditer(r"^\| ([RSDVFX]\d+) \|(.*)$", doc, re.M)}
    assert sorted(rows) == sorted(ROWS)
    for row, line in rows.items():
        cited = re.findall(r"`(tests/\w+\.py)::(\w+)`", line)
        sources = [_test_source(root / path, name) for path, name in cited]
        assert cited and all(sources), f"{row}: a test it names does not exist: {cited}"
        assert any(re.search(rf"\b{row}\b|^def test_{row.lower()}_", src) for src in sources), row


def test_r8_keep_last_n_keeps_exactly_the_newest_n_and_best(tmp_path):
    """R8 with train.keep_last=3 over 5 saves: `last` + the 2 saves before it (`step-*`) + `best`;
    older ones deleted. Auto-resume falls back to the newest `step-*` when `last` is gone."""
    from mmtune import checkpoint as ckpt
    from mmtune.config import load_config

    over = tiny_overrides(
        tmp_path, **{"train.max_steps": 5, "train.save_every": 1, "train.eval_every": 1, "train.keep_last": 3}
    )
    api.train(load_config(None, over))
    root = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["best", "last", "step-00000003", "step-00000004"], names
    assert [read_meta(root / n)["state"]["step"] for n in names[1:]] == [5, 3, 4]
    assert all(verify(root / n) for n in names)
    shutil.rmtree(root / "last")
    assert ckpt.latest(root) == root / "step-00000004"
