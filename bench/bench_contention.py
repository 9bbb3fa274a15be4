"""Training on a busy CPU, as ratios measured side by side in one run → runs/bench/contention.json.

The demo configuration's training samples/s, in persistent worker processes that each train
`--steps` steps per cue (start-up, data loading and the model load are not timed), alternated
over `--rounds` rounds:

- `shared_ratio`: beside one busy single-thread CPU-bound process / alone (target ≥ 0.45);
- `pair_ratio_a`, `pair_ratio_b`: two mmtune trainings started together, each / alone (≥ 0.40);
- `quiet_ratio`: mmtune's defaults alone / the old defaults alone — torch imported before
  mmtune, so libgomp keeps its spin-waiting default (target ≥ 0.95).

Each ratio is the median of the per-round ratios; `noise` says how loaded the machine was.

Usage: python bench/bench_contention.py [--steps 20] [--rounds 3] [--env KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = """
import sys
if sys.argv[1] == "old":
    import torch  # before mmtune: libgomp loads with its own defaults, as before mmtune set any
else:
    import mmtune  # mmtune's policy, set before torch loads
sys.argv = sys.argv[:1] + sys.argv[2:]
from bench_contention import worker
worker(int(sys.argv[1]), sys.argv[2])
"""


def worker(steps: int, config: str) -> None:
    """Set the demo up once, then train `steps` steps per line on stdin; print samples/s."""
    import tempfile

    import torch

    from mmtune.api import build_data
    from mmtune.config import load_config
    from mmtune.engine import Trainer, make_accelerator
    from mmtune.tasks import Context, get_task

    out = tempfile.mkdtemp(prefix="contention-")
    cfg = load_config(
        config,
        {
            "train.max_steps": steps,
            "train.eval_every": 0,
            "train.progress": False,
            "train.log_every": steps,
            "output_dir": out,
        },
    )
    splits = build_data(cfg)
    task = get_task(cfg.task)(Context(cfg, splits))
    model = task.build()

    def burst(n: int) -> float:
        trainer = Trainer(cfg, task, model, make_accelerator(cfg, Path(out)), (splits.train, []), out)
        trainer.total_steps = n
        st = trainer.fit()
        return st.samples / st.train_seconds

    burst(3)  # warm-up: first-call allocations and kernel choices
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for _ in sys.stdin:
        print(json.dumps({"samples_per_s": burst(steps)}), flush=True)


class Worker:
    """A persistent training process; `go()` starts a burst, `result()` waits for its rate."""

    def __init__(self, mode: str, steps: int, config: str, env: dict):
        env = {**os.environ, **env, "PYTHONPATH": _pythonpath()}
        if mode == "old":  # the old defaults: nothing set before torch loads
            for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MMTUNE_THREADS"):
                env.pop(k, None)
        self.p = subprocess.Popen(
            [sys.executable, "-c", WORKER, mode, str(steps), config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.info = self._read()

    def _read(self) -> dict:
        while line := self.p.stdout.readline():
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"worker exited with {self.p.wait()}")

    def go(self) -> None:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()

    def result(self) -> float:
        return self._read()["samples_per_s"]

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(60)

    def kill(self) -> None:
        self.p.kill()
        self.p.wait()


def _pythonpath() -> str:
    here = Path(__file__).resolve().parent
    parts = [str(here), str(here.parent / "src"), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def busy() -> subprocess.Popen:
    """One single-thread CPU-bound competitor."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def one_round(a: Worker, b: Worker, old: Worker) -> dict:
    """Alone, old alone, beside the busy process, side by side: samples/s of each."""
    a.go()
    alone = a.result()
    old.go()
    old_alone = old.result()
    hog = busy()
    try:
        time.sleep(0.5)  # the competitor is running before the burst starts
        a.go()
        shared = a.result()
    finally:
        hog.kill()
        hog.wait()
    a.go(), b.go()
    pair = (a.result(), b.result())
    return {"alone": alone, "old_alone": old_alone, "shared": shared, "pair": pair}


def cpu_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / hz, sum(fields) / hz


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or platform.machine()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), platform.machine()
    )
    flags = next((ln for ln in out.splitlines() if ln.startswith("Flags")), "")
    isa = "AVX512-BF16" if "avx512_bf16" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} CPUs, {isa}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for mmtune's workers")
    p.add_argument("--out", default="runs/bench/contention.json")
    args = p.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env)
    start, (busy0, total0), load0 = time.perf_counter(), cpu_busy(), os.getloadavg()
    a = Worker("new", args.steps, args.config, env)
    b = Worker("new", args.steps, args.config, env)
    old = Worker("old", args.steps, args.config, {})
    rounds = []
    try:
        for r in range(args.rounds):
            rounds.append(one_round(a, b, old))
            print(f"round {r + 1}: " + json.dumps(rounds[-1]), flush=True)
        for w in (a, b, old):
            w.close()
    finally:  # interrupted: no training left running on the machine
        for w in (a, b, old):
            if w.p.poll() is None:
                w.kill()
    result = summarise(rounds, args, env, a.info, old.info)
    busy1, total1 = cpu_busy()
    wall = time.perf_counter() - start
    ours = resource.getrusage(resource.RUSAGE_CHILDREN)  # every worker and competitor, waited for
    result["noise"] = {
        "loadavg_1min_start_end": [load0[0], os.getloadavg()[0]],
        "machine_busy_fraction": (busy1 - busy0) / max(total1 - total0, 1e-9),
        # CPU the machine spent on other users' processes, in cores, averaged over the run
        "other_users_cores": (busy1 - busy0 - ours.ru_utime - ours.ru_stime) / wall,
        "alone_spread": max(x["alone"] for x in rounds) / min(x["alone"] for x in rounds),
        "seconds": wall,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result.items():
        print(f"{k:<14} {v:.3f}" if isinstance(v, float) else f"{k:<14} {v}")
    print(f"written to {args.out}")


def summarise(rounds: list[dict], args, env: dict, new_info: dict, old_info: dict) -> dict:
    """Median per-round ratios, plus every round's raw samples/s."""

    def med(f) -> float:
        return statistics.median(f(x) for x in rounds)

    return {
        "machine": _cpu_model(),
        "command": "make bench-contention" + "".join(f" --env {k}={v}" for k, v in env.items()),
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": new_info["threads"],
        "old_threads": old_info["threads"],
        "env": env,
        "shared_ratio": med(lambda x: x["shared"] / x["alone"]),
        "pair_ratio_a": med(lambda x: x["pair"][0] / x["alone"]),
        "pair_ratio_b": med(lambda x: x["pair"][1] / x["alone"]),
        "quiet_ratio": med(lambda x: x["alone"] / x["old_alone"]),
        "alone_samples_per_s": med(lambda x: x["alone"]),
        "old_alone_samples_per_s": med(lambda x: x["old_alone"]),
        "rounds_raw": rounds,
    }


if __name__ == "__main__":
    main()
