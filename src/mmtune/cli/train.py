"""`mmtune train | eval | demo`: the one training loop and evaluation of a run."""

from __future__ import annotations

import json
from pathlib import Path

from mmtune.cli.benchmark import add_benchmark_args, cmd_eval_benchmark
from mmtune.cli.common import configs_dir, load_cfg, print_metrics
from mmtune.errors import UserError

DEMO_CONFIG = "demo.yaml"


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model as a YAML config says")
    t.add_argument("--config", "-c", help="YAML config (defaults when omitted)")
    t.add_argument("--name", help="run name (run folder = output_dir/name)")
    t.add_argument("--resume", help="RUN_DIR or checkpoint folder to continue, or 'auto'")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run's checkpoint, or any model on zero-shot benchmarks")
    e.add_argument("--checkpoint", help="run folder or checkpoint folder")
    e.add_argument("--config", "-c", help="config for the data (default: the run's config.yaml)")
    e.add_argument("--split", choices=["train", "val", "test"], help="split to evaluate")
    e.add_argument("--output", "-o", help="also write the metrics to this JSON file (--suite: a folder)")
    e.add_argument(
        "--artifacts",
        help="also write the evaluation's tables (DIR/tables/*.json: e.g. per-class results and the "
        "confusion matrix, classes in data.classnames order) and plots into this folder",
    )
    add_benchmark_args(e)
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="fine-tune lit-minilm on digits, evaluate zero-shot")
    d.add_argument("--config", "-c", help="override the demo config")
    d.add_argument("--name", help="run name (default: demo)")
    d.set_defaults(func=cmd_demo)


def cmd_train(args, extra) -> int:
    from mmtune import api

    cfg = load_cfg(args, extra)
    metrics = api.train(cfg, resume=args.resume)
    if metrics:
        print_metrics(metrics)
        print(f"run folder: {cfg.run_dir}  report: {cfg.run_dir / 'report.html'}")
    return 0


def cmd_eval(args, extra) -> int:
    from mmtune import api
    from mmtune.config import load_config, parse_overrides
    from mmtune.runs import resolve_checkpoint, run_config

    if args.benchmark or args.suite:
        return cmd_eval_benchmark(args, extra)
    if not args.checkpoint:
        raise UserError("mmtune eval needs --checkpoint RUN, or --benchmark B with --model M, or --suite FILE")
    if args.split == "train":
        raise UserError("--split train is for --benchmark; a run is evaluated on val or test")
    ckpt = Path(args.checkpoint)
    overrides = parse_overrides(extra)
    # without --config: the run's own config (data, options), in today's keys
    cfg = load_config(args.config, overrides) if args.config else run_config(resolve_checkpoint(ckpt)[0], overrides)
    metrics = api.evaluate(ckpt, cfg, split=args.split, artifacts=args.artifacts)
    print_metrics(metrics)
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"metrics written to {args.output}")
    if args.artifacts:
        print(f"tables and plots written to {args.artifacts}")
    return 0


def cmd_demo(args, extra) -> int:
    import time

    from mmtune import api

    cfg = load_cfg(args, extra, default=str(configs_dir() / DEMO_CONFIG))
    run_dir = cfg.run_dir
    if (run_dir / "metrics.jsonl").exists():
        import shutil

        shutil.rmtree(run_dir)  # the demo always starts afresh
    start = time.perf_counter()
    metrics = api.train(cfg)
    print_metrics(metrics)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    print(f"report: {run_dir / 'report.html'}")
    return 0
