"""`mmtune data benchmark DATASET -o DIR`: a labelled dataset in CLIP_benchmark's layout;
`mmtune eval --benchmark B --model M` and `mmtune eval --suite FILE`: zero-shot benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

from mmtune.errors import UserError


def add_benchmark(dsub) -> None:
    """Register `data benchmark` under the `data` command group."""
    b = dsub.add_parser("benchmark", help="write CLIP_benchmark's WebDataset layout (zero-shot)")
    b.add_argument("dataset", help="labelled dataset: `digits`, an ImageFolder, a pairs file…")
    b.add_argument("--output", "-o", required=True, help="empty folder to write")
    b.add_argument(
        "--split", action="append", choices=["train", "val", "test"], help="split(s) to write (default: test)"
    )
    b.add_argument("--samples-per-shard", type=int, default=10_000)
    b.add_argument("--config", "-c", help="config whose `data` section reads the dataset")
    b.set_defaults(func=cmd_benchmark)


def cmd_benchmark(args, extra) -> int:
    from mmtune.config import load_config, parse_overrides
    from mmtune.data import load_splits, screen
    from mmtune.data.benchmark import write_benchmark

    overrides = parse_overrides(extra)
    overrides["data.dataset"] = args.dataset
    cfg = load_config(args.config, overrides)
    splits = load_splits(cfg.data, cfg.seed)
    chosen = {}
    for name in args.split or ["test"]:
        good, bad = screen(splits.get(name), "skip", cfg.data.max_image_pixels, 1.0, "checking")
        if bad:
            print(f"{name}: left out {sum(bad.values())} bad samples: {dict(bad)}")
        chosen[name] = good
    counts = write_benchmark(chosen, splits.classes, splits.eval_templates, args.output, args.samples_per_shard)
    shown = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"wrote {shown} samples, {len(splits.classes)} classes to {args.output}")
    return 0


def add_benchmark_args(e) -> None:
    """The benchmark options of `mmtune eval`."""
    e.add_argument(
        "--benchmark",
        action="append",
        help="zero-shot benchmark (repeatable): a CLIP_benchmark folder, a built-in dataset or a data path",
    )
    e.add_argument(
        "--model", help="with --benchmark: any model.name (preset, hub id, transformers/open_clip folder, run)"
    )
    e.add_argument(
        "--task",
        choices=["auto", "zeroshot_classification", "zeroshot_retrieval", "linear_probe"],
        default="auto",
        help="with --benchmark (default auto: classification when labelled, else retrieval; "
        "linear_probe fits on the benchmark's train split)",
    )
    e.add_argument("--suite", help="suite YAML: models × benchmarks → one table (-o: its folder)")


def cmd_eval_benchmark(args, extra) -> int:
    from mmtune.config import parse_overrides
    from mmtune.suite import (
        EVAL_TASK,
        BenchmarkSpec,
        ModelSpec,
        evaluate_model,
        load_benchmark,
        read_suite,
        run_suite,
    )

    overrides = parse_overrides(extra)
    if args.suite:
        if args.benchmark or args.model or args.checkpoint:
            raise UserError("--suite names its own models and benchmarks: drop --benchmark/--model/--checkpoint")
        suite = read_suite(args.suite)
        out = Path(args.output or Path("runs") / f"suite-{Path(args.suite).stem}")
        table = run_suite(suite, out, overrides)
        from mmtune.suite_table import to_markdown

        print(to_markdown(table), end="")
        print(f"table: {out / 'table.md'} (also .csv, .json, .svg, report.html); results: {out / 'results'}")
        return 0
    model = args.model or args.checkpoint
    if not model:
        raise UserError("--benchmark needs --model (any model.name) or --checkpoint RUN")
    from mmtune.config import load_config

    cfg = load_config(None, {**overrides, "task": EVAL_TASK})
    specs = [BenchmarkSpec(path=b, task=args.task, split=args.split or "test") for b in args.benchmark]
    results = evaluate_model(ModelSpec(model=model), [load_benchmark(s, cfg) for s in specs], overrides)
    for r in results:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items() if "." not in k)
        print(f"{r['dataset']} ({r['task']}, {r['metrics']['data.samples']} samples): {shown}")
    if args.output:
        _write_results(results, args.output)
    return 0


def _write_results(results: list[dict], output: str) -> None:
    """One result: CLIP_benchmark's object; several: a list, or one file each when the name holds
    CLIP_benchmark's placeholders ({dataset}, {model}, {task}, {split})."""
    from mmtune.suite import safe_name

    if "{" in output:
        for r in results:
            fields = {k: safe_name(str(r[k])) for k in ("dataset", "model", "task", "split")}
            try:
                path = Path(output.format(**fields))
            except (KeyError, IndexError, ValueError):
                raise UserError(
                    f"--output {output}: placeholders are {{dataset}} {{model}} {{task}} {{split}}"
                ) from None
            path.write_text(json.dumps(r, indent=1) + "\n")
            print(f"results written to {path}")
        return
    Path(output).write_text(json.dumps(results[0] if len(results) == 1 else results, indent=1) + "\n")
    print(f"results written to {output}")
