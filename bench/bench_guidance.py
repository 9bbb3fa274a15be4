"""Guidance sweep of a text2image run on `shapes-gen`: the checker's accuracy per guidance scale.

    python bench/bench_guidance.py runs/text2image-shapes --guidance 1.5 2 3 -n 32

For each scale, `-n` candidates per prompt are sampled (the run's temperature and top-k, the same
seed) for two prompt sets of 16: `seen_prompts()`, combinations that training captions show, and
`heldout_prompts()`, the evaluation set. Printed per set: the share of correct candidates (no
re-ranking) and, with the run's re-ranker (or `--reranker`), the share of prompts whose best
candidate is correct (`best_of_N`; `--best-of 16 64` also re-ranks the first 16 and 64 of the same
candidates).
The shipped guidance was chosen on the seen set alone, so the held-out figures stay a test.
Writes the table to `--out` (default: RUN/tables/guidance_sweep.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def sweep(
    run: str, scales: list[float], n: int, seed: int = 0, reranker: str | None = None, best_of: list[int] | None = None
) -> list[dict]:
    import numpy as np

    from mmtune.config import load_config
    from mmtune.data.builtin.shapes_check import check
    from mmtune.data.builtin.shapes_gen import heldout_prompts, seen_prompts
    from mmtune.generation import Reranker, generate_images, rerank
    from mmtune.runs import load_run
    from mmtune.tasks.text2image import T2IOptions

    model, proc = load_run(run)
    opts = T2IOptions(**load_config(Path(run) / "config.yaml").options)
    reranker = reranker or opts.reranker
    ranker = Reranker(reranker) if reranker and reranker != "none" else None
    rows = []
    for g in scales:
        row = {"guidance": g, "candidates": n}
        for name, prompts in (("seen", seen_prompts()), ("heldout", heldout_prompts())):
            images = generate_images(model, proc, prompts, n, seed, g, opts.temperature, opts.top_k)
            ok = [[all(check(im, p)) for im in cands] for p, cands in zip(prompts, images, strict=True)]
            row[f"{name}.raw"] = round(float(np.mean(ok)), 4)
            if ranker:
                scores = [ranker.scores(c, p) for p, c in zip(prompts, images, strict=True)]
                for k in sorted({n, *(best_of or [])}):
                    if k <= n:  # the first k of the same candidates
                        best = [o[rerank(sc[:k], 1)[0]] for sc, o in zip(scores, ok, strict=True)]
                        row[f"{name}.best_of_{k}"] = round(float(np.mean(best)), 4)
        print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    ap.add_argument("-n", type=int, default=32, help="candidates per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--best-of", type=int, nargs="*", default=[], help="also re-rank only the first k candidates, for each k"
    )
    ap.add_argument("--reranker", default=None, help="dual-encoder run (default: the run's own)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("MMTUNE_THREADS", "1")))
    rows = sweep(a.run, a.guidance, a.n, a.seed, a.reranker, a.best_of)
    out = Path(a.out) if a.out else Path(a.run) / "tables" / "guidance_sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
