"""`mmtune generate`: images from prompts with a trained text2image (or sd-lora) run, re-ranked
by a dual encoder, written as one PNG grid (a row per prompt, best first)."""

from __future__ import annotations

from pathlib import Path

from mmtune.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate images from prompts into a PNG grid")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--checkpoint", required=True, help="text2image or sd-lora run folder")
    p.add_argument("-n", type=int, default=8, help="candidates per prompt (default 8)")
    p.add_argument("--out", default="grid.png", help="PNG grid to write (default grid.png)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the run's)")
    p.add_argument("--temperature", type=float, help="text2image: sampling temperature")
    p.add_argument("--top-k", type=int, help="text2image: sample among the k likeliest codes")
    p.add_argument("--keep", type=int, help="keep the best k candidates per prompt (default all)")
    p.add_argument(
        "--reranker",
        help="dual-encoder run scoring the candidates (default: the "
        "run's options.reranker; 'none' to switch re-ranking off)",
    )
    p.add_argument("--scale", type=int, default=2, help="pixel scale of the grid (default 2)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args, extra) -> int:
    from mmtune.cli.common import threads
    from mmtune.generation import Reranker, grid, rerank
    from mmtune.runs import open_run

    run = Path(args.checkpoint)
    if args.n < 1:
        raise UserError(f"-n must be at least 1 (got {args.n})")
    if args.keep is not None and args.keep < 1:
        raise UserError(f"--keep must be at least 1 (got {args.keep})")
    threads()
    task, model = open_run(run)
    settings = {"guidance": args.guidance, "temperature": args.temperature, "top_k": args.top_k}
    images = task.generate(model, list(args.prompts), args.n, args.seed, settings)
    ranker_run = args.reranker if args.reranker is not None else task.default_reranker()
    ranker = None
    if ranker_run and ranker_run != "none":
        if not Path(ranker_run).exists():
            raise UserError(f"re-ranker run {ranker_run} not found (pass --reranker none to skip)")
        ranker = Reranker(ranker_run)
    rows = []
    for prompt, cands in zip(args.prompts, images, strict=True):
        if ranker is None:
            order, scores = list(range(len(cands))), None
        else:
            scores = ranker.scores(cands, prompt)
            order = rerank(scores, len(cands))
        order = order[: args.keep or len(order)]
        rows.append([cands[i] for i in order])
        print(prompt)
        for rank, i in enumerate(order):
            score = "" if scores is None else f"  score {float(scores[i]):.4f}"
            print(f"  #{rank + 1} candidate {i}{score}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(rows, scale=args.scale).save(out, format="PNG")
    print(f"wrote {out} ({len(rows)} × {max(len(r) for r in rows)})")
    return 0
