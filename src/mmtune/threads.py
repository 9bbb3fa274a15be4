"""CPU thread policy: a fair share of a busy CPU by default, set before torch is imported.

torch's CPU wheel runs its intra-op pool on GNU OpenMP (libgomp). By default an idle libgomp
thread spins at a barrier (up to ~300,000 iterations) before it sleeps; when another process
deschedules one team member, its siblings burn their time slices spinning for it, and the
whole process falls to a fraction of its share. mmtune makes a waiting thread spin briefly and
then sleep, so a busy core goes to whoever has work. libgomp reads these variables once, when it is
loaded, hence `apply()` runs on `import mmtune` and at the start of the `mmtune` entry point
(a program that imports torch before mmtune keeps libgomp's default: export OMP_WAIT_POLICY).
Measured in docs/benchmarks.md (`make bench-contention`).
"""

from __future__ import annotations

import os
import sys

# The policy, only where the user has set neither variable: a thread waiting at a barrier spins
# briefly (GOMP_SPINCOUNT=6000 iterations, against libgomp's 300,000) and then sleeps
# (OMP_WAIT_POLICY=PASSIVE, whose own spin count of 0 an explicit GOMP_SPINCOUNT overrides). A
# sibling that is about to arrive is still caught spinning on a quiet machine; one descheduled by
# another process is not waited for. The thread count stays torch's default (the physical cores).
# Measured in docs/benchmarks.md: spin 0 lost 12-15% alone on a quiet machine, 6,000 lost 3%.
DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "6000"}


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
    user_policy = any(k in environ for k in DEFAULTS)  # the user's own wait policy is kept whole
    changed = {} if user_policy else dict(DEFAULTS)
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
