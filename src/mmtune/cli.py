"""`mmtune` command line: train, eval, demo. User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mmtune.errors import UserError

DEMO_CONFIG = "demo.yaml"

# Subcommands that live beside their code: each module has `add_parser(subparsers)`, which
# registers its subcommand(s) with `set_defaults(func=handler)`; handler(args, extra) -> exit code.
# Imports of heavy libraries stay inside the handlers, so `mmtune --help` stays fast.
PLUGIN_COMMANDS: tuple[str, ...] = (
    "mmtune.commands_retrieval",
    "mmtune.commands_scale",
    "mmtune.classify.cli",
    "mmtune.interpolate",
    "mmtune.commands_predict",
    "mmtune.commands_generate",
    "mmtune.sweep.cli",
    "mmtune.compare",
)


def _configs_dir() -> Path:
    # Shipped configs live at the repository root (and are copied into the package when built).
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "configs", here.parent / "configs"):
        if cand.is_dir():
            return cand
    raise UserError("shipped configs/ folder not found; pass --config PATH")


def _load_cfg(args, extra: list[str], default: str | None = None):
    from mmtune.config import load_config, parse_overrides

    path = args.config or default
    overrides = parse_overrides(extra)
    if getattr(args, "name", None):
        overrides["name"] = args.name
    return load_config(path, overrides)


def _print_metrics(metrics: dict) -> None:
    width = max((len(k) for k in metrics), default=0)
    for k, v in metrics.items():
        shown = f"{v:.4f}" if isinstance(v, float) else str(v)
        print(f"  {k:<{width}}  {shown}")


def cmd_train(args, extra) -> int:
    from mmtune import api

    cfg = _load_cfg(args, extra)
    metrics = api.train(cfg, resume=args.resume)
    if metrics:
        _print_metrics(metrics)
        print(f"run folder: {cfg.run_dir}  report: {cfg.run_dir / 'report.html'}")
    return 0


def cmd_eval(args, extra) -> int:
    from mmtune import api
    from mmtune.config import load_config, parse_overrides

    ckpt = Path(args.checkpoint)
    saved = ckpt / "config.yaml"
    base = args.config or (str(saved) if saved.is_file() else None)
    cfg = load_config(base, parse_overrides(extra))
    metrics = api.evaluate(ckpt, cfg, split=args.split)
    _print_metrics(metrics)
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"metrics written to {args.output}")
    return 0


def cmd_demo(args, extra) -> int:
    import time

    from mmtune import api

    cfg = _load_cfg(args, extra, default=str(_configs_dir() / DEMO_CONFIG))
    run_dir = cfg.run_dir
    if (run_dir / "metrics.jsonl").exists():
        import shutil

        shutil.rmtree(run_dir)  # the demo always starts afresh
    start = time.perf_counter()
    metrics = api.train(cfg)
    _print_metrics(metrics)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    print(f"report: {run_dir / 'report.html'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmtune",
        description="Fine-tune, evaluate and serve CLIP-family vision-language models.",
        epilog="Any config field can be overridden: train.lr=1e-4 or --train.lr 1e-4.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model as a YAML config says")
    t.add_argument("--config", "-c", help="YAML config (defaults when omitted)")
    t.add_argument("--name", help="run name (run folder = output_dir/name)")
    t.add_argument("--resume", help="RUN_DIR or checkpoint folder to continue, or 'auto'")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run's checkpoint")
    e.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    e.add_argument("--config", "-c", help="config for the data (default: the run's config.yaml)")
    e.add_argument("--split", choices=["val", "test"], help="split to evaluate")
    e.add_argument("--output", "-o", help="also write the metrics to this JSON file")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="fine-tune lit-minilm on digits, evaluate zero-shot")
    d.add_argument("--config", "-c", help="override the demo config")
    d.add_argument("--name", help="run name (default: demo)")
    d.set_defaults(func=cmd_demo)

    import importlib

    for module in PLUGIN_COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # load reports of unused pooler weights are noise here
        hf_logging.disable_progress_bar()
    try:
        return args.func(args, extra)
    except UserError as e:
        print(f"mmtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmtune: interrupted; resume with --resume auto", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
