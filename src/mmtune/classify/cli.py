"""`mmtune classify`: run and compare classification methods (see mmtune.classify.compare)."""

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

    from mmtune.classify.compare import run
    from mmtune.cli import _configs_dir, _load_cfg, _print_metrics

    default = None if args.config else str(_configs_dir() / DEFAULT_CONFIG)
    cfg = _load_cfg(args, extra, default=default)
    start = time.perf_counter()
    metrics = run(cfg, overwrite=args.overwrite)
    keys = [k for k in metrics if k.endswith((".test.top1", ".shift.top1", "trainable_params"))]
    _print_metrics({k: metrics[k] for k in keys + [k for k in metrics if k == "wise-ft.alpha"]})
    print(f"classify finished in {time.perf_counter() - start:.1f} s")
    print(f"run folder: {cfg.run_dir}  report: {cfg.run_dir / 'report.html'}")
    return 0
