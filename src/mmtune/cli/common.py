"""What the command modules share: configs, overrides, printing figures, threads."""

from __future__ import annotations

from pathlib import Path

from mmtune.errors import UserError


def configs_dir() -> Path:
    # Shipped configs live at the repository root (and are copied into the package when built).
    here = Path(__file__).resolve()
    for cand in (here.parents[3] / "configs", here.parents[1] / "configs"):
        if cand.is_dir():
            return cand
    raise UserError("shipped configs/ folder not found; pass --config PATH")


def load_cfg(args, extra: list[str], default: str | None = None):
    from mmtune.config import load_config, parse_overrides

    path = args.config or default
    overrides = parse_overrides(extra)
    if getattr(args, "name", None):
        overrides["name"] = args.name
    return load_config(path, overrides)


def print_metrics(metrics: dict) -> None:
    width = max((len(k) for k in metrics), default=0)
    for k, v in metrics.items():
        shown = f"{v:.4f}" if isinstance(v, float) else str(v)
        print(f"  {k:<{width}}  {shown}")


def overrides(extra: list[str]) -> dict:
    """`key=value` / `--key value` tokens left over by argparse → dotted overrides."""
    from mmtune.config import parse_overrides

    return parse_overrides(extra)


def threads() -> None:
    """Apply the thread policy before heavy work (MMTUNE_THREADS)."""
    from mmtune.api import configure_threads

    configure_threads()
