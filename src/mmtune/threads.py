"""CPU thread policy: a fair share of a busy CPU by default, set before torch is imported.

torch's CPU wheel runs its intra-op pool on GNU OpenMP (libgomp). By default an idle libgomp
thread spins at a barrier (up to ~300,000 iterations) before it sleeps; when another process
deschedules one team member, its siblings burn their time slices spinning for it, and the
whole process falls to a fraction of its share. Passive waiting makes an idle thread sleep at
once, so a busy core goes to whoever has work. libgomp reads these variables once, when it is
loaded, hence `apply()` runs on `import mmtune` and at the start of the `mmtune` entry point
(a program that imports torch before mmtune keeps libgomp's default: export OMP_WAIT_POLICY).
Measured in docs/benchmarks.md (`make bench-contention`).
"""

from __future__ import annotations

import os
import sys

# The policy, each only where the user has not set it: OMP_WAIT_POLICY=PASSIVE sleeps at once
# at a barrier (libgomp's GOMP_SPINCOUNT then defaults to 0); the thread count stays torch's
# default (the physical cores), which alone is as fast as before.
DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def threads_override() -> int | None:
    """MMTUNE_THREADS as a positive int, or None when unset or empty."""
    raw = os.environ.get("MMTUNE_THREADS", "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"MMTUNE_THREADS={raw!r}: expected a positive integer")
    return n


def apply(environ=os.environ) -> dict[str, str]:
    """Set the OpenMP wait policy and MMTUNE_THREADS' thread count; returns what it set."""
    changed = {k: v for k, v in DEFAULTS.items() if k not in environ}
    try:
        n = threads_override()
    except ValueError as e:  # a bad value must not stop `import mmtune`: say so, use defaults
        print(f"mmtune: warning: {e}; ignored", file=sys.stderr)
        n = None
    if n is not None:  # MMTUNE_THREADS wins over an inherited OMP_NUM_THREADS
        changed["OMP_NUM_THREADS"] = str(n)
    environ.update(changed)
    if n is not None and "torch" in sys.modules:  # imported before mmtune: too late for the env
        sys.modules["torch"].set_num_threads(n)
    return changed
