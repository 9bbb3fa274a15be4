"""Approximate vs exact search on 1,000,000 random unit vectors of dimension 512.

    make bench-index        # = python bench/bench_index.py → runs/bench/index.json

The approximate index is built by mmtune's own `build_index` from `configs/index-ivf.yaml`
(IVF trained on a sample); the exact baseline is FAISS' flat inner-product index. Both answer
the same queries in one batch on the same threads, side by side in this process;
`speedup` = approximate queries/s ÷ exact queries/s, `recall_at_10` = the mean share of the
exact top-10 the approximate top-10 finds.

Vectors: `--distribution clustered` (default) draws unit vectors around random unit centres
(one per ~250 vectors), the topic-like structure real embeddings have; queries are fresh draws
from the same mixture, never database vectors. `--distribution uniform` (isotropic random unit
vectors, no structure at all) is the worst case for every approximate method: there the 10
nearest neighbours are barely nearer than any other vector.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mmtune.retrieval import IndexConfig, _faiss, build_index, load_section  # noqa: E402


def unit_vectors(n: int, dim: int, rng, centres: np.ndarray | None, chunk: int = 100_000):
    """(n, dim) float32 unit vectors, around `centres` when given, made in chunks (bounded memory)."""
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if centres is not None:
            x /= np.sqrt(dim)  # noise of norm ≈ 1: same-centre vectors have cosine ≈ 0.5
            x += centres[rng.integers(len(centres), size=m)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + m] = x
    return out


def recall_of(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k found by the approximate top-k."""
    return float(np.mean([len(set(f) & set(g)) / k for f, g in zip(found, truth, strict=True)]))


def timed_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    index.search(queries[:10], k)  # warm-up
    t = time.perf_counter()
    _, rows = index.search(queries, k)
    return rows, len(queries) / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--distribution", choices=["clustered", "uniform"], default="clustered")
    p.add_argument("--config", default=str(ROOT / "configs" / "index-ivf.yaml"))
    p.add_argument("--output", default=str(ROOT / "runs" / "bench" / "index.json"))
    p.add_argument(
        "--sweep-nprobe", default="", help="also search at these nprobe values (comma-separated): recall/speedup curve"
    )
    p.add_argument("overrides", nargs="*", help="index config overrides, e.g. nprobe=32")
    args = p.parse_args(argv)

    from mmtune.config import parse_overrides

    cfg = load_section(args.config, parse_overrides(args.overrides), IndexConfig)
    faiss = _faiss()
    rng = np.random.default_rng(0)
    centres = None
    if args.distribution == "clustered":
        centres = unit_vectors(max(1, args.n // 250), args.dim, rng, None)
    t = time.perf_counter()
    base = unit_vectors(args.n, args.dim, rng, centres)
    queries = unit_vectors(args.queries, args.dim, rng, centres)
    print(f"{args.n:,} × {args.dim} {args.distribution} vectors in {time.perf_counter() - t:.1f} s")

    exact = faiss.IndexFlatIP(args.dim)
    exact.add(base)
    truth, exact_qps = timed_search(exact, queries, args.k)
    del exact  # keep one copy of the vectors besides `base`
    print(f"exact: {exact_qps:.1f} queries/s")

    t = time.perf_counter()
    approx = build_index(base, cfg)
    build_s = time.perf_counter() - t
    found, approx_qps = timed_search(approx, queries, args.k)
    recall = recall_of(found, truth, args.k)
    ivf = faiss.try_extract_index_ivf(approx) if cfg.kind != "hnsw" else None
    curve = []
    for nprobe in [int(x) for x in args.sweep_nprobe.split(",") if x] if ivf is not None else []:
        ivf.nprobe = nprobe
        rows, qps = timed_search(approx, queries, args.k)
        curve.append(
            {
                "nprobe": nprobe,
                "recall_at_10": round(recall_of(rows, truth, args.k), 4),
                "speedup": round(qps / exact_qps, 2),
            }
        )
        print(json.dumps(curve[-1]), flush=True)
    if ivf is not None:
        ivf.nprobe = cfg.nprobe
    result = {
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "distribution": args.distribution,
        "kind": cfg.kind,
        "nlist": int(ivf.nlist) if ivf is not None else None,
        "nprobe": int(ivf.nprobe) if ivf is not None else None,
        "train_size": cfg.train_size,
        "threads": faiss.omp_get_max_threads(),
        "build_s": round(build_s, 1),
        "exact_qps": round(exact_qps, 1),
        "approx_qps": round(approx_qps, 1),
        "speedup": round(approx_qps / exact_qps, 2),
        "recall_at_10": round(recall, 4),
        "nprobe_curve": curve,
        "command": " ".join(["python bench/bench_index.py", *(argv or sys.argv[1:])]),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = result["recall_at_10"] >= 0.95 and result["speedup"] >= 10
    print("targets (recall_at_10 ≥ 0.95, speedup ≥ 10):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
