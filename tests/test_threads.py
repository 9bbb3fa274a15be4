"""The thread policy: set by `import mmtune` (and so by the CLI) before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
CLEAN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MMTUNE_THREADS")


def run(code: str, **env) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh interpreter with only `env` of the thread variables set."""
    base = {k: v for k, v in os.environ.items() if k not in CLEAN}
    base["PYTHONPATH"] = os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=120, check=True
    )


WAIT = "import os, {m}; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def test_import_mmtune_and_the_cli_set_a_short_spin_then_passive_wait():
    assert run(WAIT.format(m="mmtune")).stdout.split() == ["PASSIVE", "6000"]
    assert run(WAIT.format(m="mmtune.cli")).stdout.split() == ["PASSIVE", "6000"]


def test_a_users_own_wait_policy_is_kept():
    assert run(WAIT.format(m="mmtune"), OMP_WAIT_POLICY="ACTIVE").stdout.split() == ["ACTIVE", "None"]
    assert run(WAIT.format(m="mmtune"), GOMP_SPINCOUNT="0").stdout.split() == ["None", "0"]


def test_mmtune_threads_sets_torch_threads_before_and_after_torch_loads():
    after = "import mmtune, torch; print(torch.get_num_threads())"
    before = "import torch; torch.set_num_threads(2); import mmtune; print(torch.get_num_threads())"
    assert run(after, MMTUNE_THREADS="1", OMP_NUM_THREADS="2").stdout.split() == ["1"]
    assert run(before, MMTUNE_THREADS="1").stdout.split() == ["1"]


def test_a_bad_mmtune_threads_warns_and_keeps_the_default():
    r = run("import mmtune, torch; print(torch.get_num_threads() >= 1)", MMTUNE_THREADS="two")
    assert r.stdout.split() == ["True"]
    assert "MMTUNE_THREADS='two'" in r.stderr and "ignored" in r.stderr
