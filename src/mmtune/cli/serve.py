"""`mmtune serve`: the HTTP server for one run's model (and an optional index)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mmtune.cli.common import overrides, threads
from mmtune.cli.retrieval import add_backend_args
from mmtune.errors import UserError


def add_parser(sub) -> None:
    v = sub.add_parser(
        "serve", help="HTTP server: embed, classify, search, predict, OpenAI-compatible chat, a search page"
    )
    v.add_argument("checkpoint", nargs="?", help="run folder (default: the index's checkpoint)")
    v.add_argument("--index", help="index folder for /v1/search and the page")
    v.add_argument(
        "--config",
        "-c",
        help="serve YAML (configs/serve.yaml); key=value overrides (options.* / data.* keys: the run's "
        "config, e.g. options.templates=openai-imagenet data.classnames=classes.txt)",
    )
    v.add_argument("--host", help="bind address (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, help="port (default 8000)")
    add_backend_args(v)
    v.set_defaults(func=cmd_serve)


def cmd_serve(args, extra) -> int:
    from mmtune.retrieval import load_section
    from mmtune.serve import Backend, ServeConfig, create_app
    from mmtune.serve.run import run_server

    if args.checkpoint and "=" in args.checkpoint and not Path(args.checkpoint).exists():
        extra, args.checkpoint = [args.checkpoint, *extra], None  # an override, not a path
    over = overrides(extra)
    # keys of the run's own config (its prompt templates, class names) go to the run
    run_over = {k: over.pop(k) for k in list(over) if k.startswith(("options.", "data."))}
    for key in ("host", "port"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    cfg = load_section(args.config, over, ServeConfig)
    ckpt = args.checkpoint
    if ckpt is None and args.index:
        info = json.loads((Path(args.index) / "index.json").read_text())
        ckpt = info.get("checkpoint")
    if not ckpt:
        raise UserError("give the model to serve: mmtune serve RUN [--index DIR]")
    key = None
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise UserError(f"api_key_env={cfg.api_key_env} but that variable is empty")
    threads()

    def load():
        return Backend.from_run(ckpt, args.index, cfg.tasks, args.backend, args.quantize, run_over)

    # an ONNX export that fails must stop the command with its message, so it loads first
    app = create_app(load() if args.backend == "onnx" else load, cfg, api_key=key)
    print(f"serving {ckpt} on http://{cfg.host}:{cfg.port}/", flush=True)
    run_server(app, cfg.host, cfg.port, cfg.access_log)
    return 0
