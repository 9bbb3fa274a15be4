"""`mmtune sweep`: hyper-parameter search over a space file, resumable, pruned, in parallel."""

from __future__ import annotations

import os
from pathlib import Path


def add_parser(sub) -> None:
    from mmtune.sweep.study import PRUNERS, SAMPLERS

    p = sub.add_parser(
        "sweep",
        help="hyper-parameter search (Optuna) over a space file; run again to continue",
        description="Train one run per trial under runs/SWEEP/, optimising the selection metric "
        "on the validation split; write best.yaml, trials.csv and report.html.",
    )
    p.add_argument("--config", "-c", required=True, help="base YAML config")
    p.add_argument("--space", required=True, help="YAML space file: config keys → distributions")
    p.add_argument("--trials", type=int, default=20, help="finished trials the study should hold")
    p.add_argument("--metric", help="objective (default: the config's eval.metric)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--pruner", choices=PRUNERS, default="median")
    p.add_argument("--storage", help="Optuna storage URL (default: SQLite in the sweep folder)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes sharing the study")
    p.add_argument("--name", help="sweep name (folder output_dir/SWEEP; default: the config's)")
    p.add_argument("--baseline", metavar="RUN", help="a finished run to set beside the best trial")
    p.add_argument("--no-cache", action="store_true", help="reload data and model every trial")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args, extra) -> int:
    from mmtune.cli.common import print_metrics
    from mmtune.config import parse_overrides
    from mmtune.errors import ConfigError
    from mmtune.sweep import objective_of
    from mmtune.sweep.run import run_sweep
    from mmtune.sweep.space import Base, load_space
    from mmtune.sweep.study import Sweep

    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("mmtune sweep needs optuna: pip install 'mmtune[sweep]'") from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("mmtune sweep under torchrun is not supported yet: use --jobs N")
    if args.trials < 1 or args.jobs < 1:
        raise ConfigError("--trials and --jobs must be at least 1")
    overrides = parse_overrides(extra)
    if args.metric:
        overrides["eval.metric"] = args.metric
    base = Base(args.config, overrides)
    cfg = base.load()
    space = load_space(args.space, base)
    name = args.name or cfg.name
    folder = Path(cfg.output_dir) / name
    sw = Sweep(
        base,
        space,
        folder,
        name,
        args.trials,
        args.sampler,
        args.pruner,
        args.storage,
        cache=not args.no_cache,
        seed=cfg.seed,
        objective=objective_of(cfg),
    )
    summary = run_sweep(sw, args.jobs, args.baseline)
    print_metrics({k: v for k, v in summary.items() if not isinstance(v, dict)})
    print(f"sweep folder: {folder}  best config: {folder / 'best.yaml'}")
    print(f"report: {folder / 'report.html'}")
    return 0
