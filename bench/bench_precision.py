"""The demo in bf16 vs fp32, side by side → runs/bench/precision.json.

Trains configs/demo.yaml (`mmtune train`, the shipped budget) with `train.precision=bf16` and with
`fp32`, alternated for `--rounds` rounds, and reports for each: training seconds, samples/s, the
test split's zero-shot top-1 and retrieval R@1 (from the best-on-val checkpoint, as the demo
reports them), and the MFU — the FLOP/s achieved (FLOPs of one training step counted by
`torch.utils.flop_counter`, the locked text tower's cache filled as in training, times steps/s)
over this machine's measured matmul peak (2048² matmul, best of 3) in that dtype. `speedup` = bf16 samples/s over fp32 samples/s (median of the rounds' ratios).

On a CPU without native bf16 (AVX2 only) mmtune trains a bf16 config in fp32 (precision.py): the
script says so in `bf16_native` and the two rows then measure the same thing.

    python bench/bench_precision.py [--rounds 2] [--out runs/bench/precision.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# isort: off
import mmtune  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch

# isort: on

from bench_train import matmul_peak

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
PRECISIONS = ("bf16", "fp32")


def train(precision: str, out: Path, name: str) -> dict:
    """One `mmtune train` of the demo in `precision`; its metrics.json."""
    cli = "import sys; from mmtune.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", cli, "train", "-c", str(CONFIG), f"output_dir={out}", f"name={name}"]
    cmd += [f"train.precision={precision}", "train.progress=false"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / name / "metrics.json").read_text())


def flops_per_sample() -> float:
    """FLOPs of one training step of the demo over its batch size (the same in either dtype)."""
    from mmtune.config import load_config
    from mmtune.data import load_splits
    from mmtune.estimate import make_batch, step_flops
    from mmtune.tasks import Context, get_task

    cfg = load_config(CONFIG)
    splits = load_splits(cfg.data, cfg.seed)
    task = get_task(cfg.task)(Context(cfg, splits))
    model = task.build()
    batch = make_batch(task, splits.train, cfg.data.batch_size, torch.device("cpu"))
    # The demo's text tower is locked: its features come from a cache that the first steps fill
    # (the captions are a few templates × 10 digits), so a training step runs it no more. Count
    # the second step, as training runs it.
    step_flops(model, task, batch)
    return step_flops(model, task, batch) / cfg.data.batch_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="runs/bench/precision.json")
    a = p.parse_args()

    from mmtune.api import configure_threads
    from mmtune.precision import native_bf16

    configure_threads()
    runs: dict[str, list[dict]] = {k: [] for k in PRECISIONS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for prec in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
                m = train(prec, Path(tmp), f"{prec}-{r}")
                runs[prec].append(m)
                print(
                    f"round {r + 1} {prec}: {m['train.seconds']:.1f} s, {m['train.samples_per_s']:.0f} samples/s, "
                    f"test zero-shot top-1 {m['zeroshot.top1']:.4f}",
                    flush=True,
                )
    per_sample = flops_per_sample()
    peaks = {
        "bf16": max(matmul_peak(torch.bfloat16) for _ in range(3)),
        "fp32": max(matmul_peak(torch.float32) for _ in range(3)),
    }
    result: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, no GPU",
        "command": "make bench-precision",
        "bf16_native": native_bf16("cpu"),
        "rounds": a.rounds,
        "flops_per_sample": per_sample,
        "peak_flops": peaks,
    }
    for prec, ms in runs.items():
        sps = statistics.median(m["train.samples_per_s"] for m in ms)
        result[prec] = {
            "train_seconds": [m["train.seconds"] for m in ms],
            "samples_per_s": [m["train.samples_per_s"] for m in ms],
            "zeroshot.top1": [m["zeroshot.top1"] for m in ms],
            "retrieval.i2t.R@1": [m.get("retrieval.i2t.R@1") for m in ms],
            "mfu": sps * per_sample / peaks[prec],
            "mfu_vs_bf16_peak": sps * per_sample / peaks["bf16"],
        }
    ratios = [
        b["train.samples_per_s"] / f["train.samples_per_s"] for b, f in zip(runs["bf16"], runs["fp32"], strict=True)
    ]
    result["speedup"] = statistics.median(ratios)
    result["speedup_rounds"] = ratios
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
