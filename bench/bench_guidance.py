"""Guidance sweep of a text2image run on `shapes-gen`: the checker's accuracy per guidance scale.

    python bench/bench_guidance.py runs/text2image-shapes --guidance 1.5 2 3 -n 32

For each scale, `-n` candidates per prompt are sampled (the run's temperature and top-k, the same
seed) for two prompt sets of 16: `seen_prompts()`, combinations that training captions show, and
`heldout_prompts()`, the evaluation set. Printed per set: the share of correct candidates (no
re-ranking) and, with the run's re-ranker, the share of prompts whose best candidate is correct.
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


def sweep(run: str, scales: list[float], n: int, seed: int = 0) -> list[dict]:
    import numpy as np

    from mmtune.config import load_config
    from mmtune.data.builtin.shapes_gen import heldout_prompts, seen_prompts
    from mmtune.generation import Reranker, check, generate_images, rerank
    from mmtune.models import load_run
    from mmtune.tasks.text2image import T2IOptions

    model, proc = load_run(run)
    opts = T2IOptions(**load_config(Path(run) / "config.yaml").options)
    ranker = Reranker(opts.reranker) if opts.reranker else None
    rows = []
    for g in scales:
        row = {"guidance": g, "candidates": n}
        for name, prompts in (("seen", seen_prompts()), ("heldout", heldout_prompts())):
            images = generate_images(model, proc, prompts, n, seed, g, opts.temperature, opts.top_k)
            ok = [
                [all(check(im, p)) for im in cands]
                for p, cands in zip(prompts, images, strict=True)
            ]
            row[f"{name}.raw"] = round(float(np.mean(ok)), 4)
            if ranker:
                best = [o[rerank(ranker.scores(c, p), 1)[0]]
                        for p, c, o in zip(prompts, images, ok, strict=True)]  # fmt: skip
                row[f"{name}.reranked"] = round(float(np.mean(best)), 4)
        print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    ap.add_argument("-n", type=int, default=32, help="candidates per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("MMTUNE_THREADS", "1")))
    rows = sweep(a.run, a.guidance, a.n, a.seed)
    out = Path(a.out) if a.out else Path(a.run) / "tables" / "guidance_sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
