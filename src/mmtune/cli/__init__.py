"""`mmtune` command line: one module per command group. User errors print one line, exit 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mmtune.errors import UserError

# Each module has `add_parser(subparsers)`, which registers its subcommand(s) with
# `set_defaults(func=handler)`; handler(args, extra) -> exit code. Imports of heavy libraries
# stay inside the handlers, so `mmtune --help` stays fast.
COMMANDS: tuple[str, ...] = (
    "mmtune.cli.train",
    "mmtune.cli.data",
    "mmtune.cli.retrieval",
    "mmtune.cli.serve",
    "mmtune.cli.export",
    "mmtune.cli.predict",
    "mmtune.cli.chat",
    "mmtune.cli.generate",
    "mmtune.cli.classify",
    "mmtune.cli.interpolate",
    "mmtune.cli.runs",
    "mmtune.cli.score",
    "mmtune.cli.convert",
    "mmtune.cli.sweep",
    "mmtune.cli.compare",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmtune",
        description="Fine-tune, evaluate and serve CLIP-family vision-language models.",
        epilog="Any config field can be overridden: train.lr=1e-4 or --train.lr 1e-4.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    for module in COMMANDS:
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
