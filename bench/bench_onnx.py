"""ONNX Runtime vs PyTorch on CPU: embeddings/s of the exported encoders, side by side.

    MMTUNE_THREADS=1 .venv/bin/python bench/bench_onnx.py   → runs/bench/onnx.json

Exports the `lit-minilm` bench model (runs/bench/serve-model, built by bench_serve.py's helper)
with `mmtune export --format onnx`, then times the same batches (64 images, 64 captions) through
PyTorch and ONNX Runtime on the same number of threads, alternating, best of 5 rounds each.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def best_rate(fn, n: int, rounds: int = 5) -> float:
    fn()
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = max(best, n / (time.perf_counter() - t))
    return best


def main() -> int:
    import onnxruntime as ort
    import torch

    from bench_serve import bench_model
    from mmtune.export import export_run
    from mmtune.runs import load_run

    threads = int(os.environ.get("MMTUNE_THREADS", "1"))
    torch.set_num_threads(threads)
    run = bench_model(ROOT / "runs" / "bench" / "serve-model")
    out = ROOT / "runs" / "bench" / "onnx-export"
    shutil.rmtree(out, ignore_errors=True)
    export_run(run, out, "onnx")
    model, proc = load_run(run)
    model.text_locked = False  # time the text tower itself, not the cache of a locked tower
    n = 64
    px = torch.randn(n, 3, proc.image_size, proc.image_size)
    tok = proc.tokenize([f"a photo of the digit {i % 10}, sample {i}" for i in range(n)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    img = ort.InferenceSession(str(out / "image_encoder.onnx"), so, ["CPUExecutionProvider"])
    txt = ort.InferenceSession(str(out / "text_encoder.onnx"), so, ["CPUExecutionProvider"])
    feeds = {k: v.numpy().astype(np.int64) for k, v in tok.items()}
    res = {"model": "lit-minilm", "batch": n, "threads": threads}
    with torch.inference_mode():
        res["torch_image_per_s"] = best_rate(lambda: model.encode_image(px), n)
        res["onnx_image_per_s"] = best_rate(lambda: img.run(None, {"pixel_values": px.numpy()}), n)
        res["torch_text_per_s"] = best_rate(lambda: model.encode_text(**tok), n)
        res["onnx_text_per_s"] = best_rate(lambda: txt.run(None, feeds), n)
    res = {k: round(v, 1) if isinstance(v, float) else v for k, v in res.items()}
    res["image_speedup"] = round(res["onnx_image_per_s"] / res["torch_image_per_s"], 2)
    res["text_speedup"] = round(res["onnx_text_per_s"] / res["torch_text_per_s"], 2)
    res["command"] = "MMTUNE_THREADS=1 .venv/bin/python bench/bench_onnx.py"
    path = ROOT / "runs" / "bench" / "onnx.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
