"""Seconds per sweep trial with the trial cache (splits and model read once per worker) and without.

Short trials of the sweep-digits setup (LoRA on digits from runs/demo), so the per-trial set-up
the cache removes is visible: both sweeps run the same trials (random sampler, same seed), one
after the other in this process, after a one-trial warm-up → runs/bench/sweep_cache.json with `ratio` = without / with.

Usage: MMTUNE_THREADS=N python bench/bench_sweep_cache.py [--trials 4] [--steps 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def sweep_seconds(cache: bool, trials: int, steps: int, out: Path) -> float:
    """Mean seconds per trial of a fresh sweep of `trials` short trials."""
    from mmtune.sweep import objective_of
    from mmtune.sweep.space import Base, load_space
    from mmtune.sweep.study import Sweep, work

    base = Base(str(ROOT / "configs" / "classify-digits.yaml"), {"output_dir": str(out)})
    space = load_space(ROOT / "configs" / "sweep-digits.yaml", base)
    # the space file fixes the trials' length; these short trials replace it
    fixed = {**space.fixed, "train.max_steps": steps, "train.eval_every": 0}
    space = dataclasses.replace(space, fixed=fixed)
    name = "cached" if cache else "uncached"
    sw = Sweep(
        base, space, out / name, name, trials, "random", "none", cache=cache, objective=objective_of(base.load())
    )
    sw.folder.mkdir(parents=True)
    start = time.perf_counter()
    work(sw)
    return (time.perf_counter() - start) / trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="runs/bench/sweep_cache.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        # a one-trial warm-up pays the one-off imports and fills the OS file cache for both
        sweep_seconds(False, 1, args.steps, tmp / "warm-up")
        with_cache = sweep_seconds(True, args.trials, args.steps, tmp)
        without = sweep_seconds(False, args.trials, args.steps, tmp)
    finally:
        shutil.rmtree(tmp)
    res = {
        "trials": args.trials,
        "steps": args.steps,
        "threads": os.environ.get("MMTUNE_THREADS"),
        "seconds_per_trial_uncached": round(without, 2),
        "seconds_per_trial_cached": round(with_cache, 2),
        "ratio": round(without / with_cache, 2),
        "load_avg_1m": os.getloadavg()[0],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
