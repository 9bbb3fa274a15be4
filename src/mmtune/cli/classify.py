"""`mmtune classify`: run and compare classification methods (`mmtune.recipes.classify_compare`)."""

from __future__ import annotations

DEFAULT_CONFIG = "classify-digits.yaml"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "classify",
        help="classification: zero-shot, linear probe, fine-tune, LoRA, LP-FT, FLYP, WiSE-FT",
        description="Run options.compare (or options.method) on one model and dataset; write "
        "RUN/METHOD/ run folders and RUN/metrics.json with a comparison table.",
    )
    p.add_argument("--config", "-c", help=f"YAML config (default: the shipped {DEFAULT_CONFIG})")
    p.add_argument("--name", help="run name (run folder = output_dir/name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.set_defaults(func=_cmd)


def _cmd(args, extra) -> int:
    import time

    from mmtune.cli.common import configs_dir, load_cfg, print_metrics
    from mmtune.recipes.classify_compare import run

    default = None if args.config else str(configs_dir() / DEFAULT_CONFIG)
    cfg = load_cfg(args, extra, default=default)
    start = time.perf_counter()
    metrics = run(cfg, overwrite=args.overwrite)
    keys = [k for k in metrics if k.endswith((".test.top1", ".shift.top1", "trainable_params"))]
    print_metrics({k: metrics[k] for k in keys + [k for k in metrics if k == "wise-ft.alpha"]})
    print(f"classify finished in {time.perf_counter() - start:.1f} s")
    print(f"run folder: {cfg.run_dir}  report: {cfg.run_dir / 'report.html'}")
    return 0
