"""`mmtune interpolate`: weight-space interpolation of two checkpoints (WiSE-FT)."""

from __future__ import annotations

from pathlib import Path

from mmtune.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "interpolate",
        help="blend two checkpoints of one architecture: (1-α)·A + α·B (WiSE-FT)",
        description="Write θ(α) = (1−α)·θ_A + α·θ_B for each --alpha as a run folder.",
    )
    p.add_argument("a", help="run folder or checkpoint (α = 0), e.g. the zero-shot model")
    p.add_argument("b", help="run folder or checkpoint (α = 1), e.g. its fine-tune")
    p.add_argument("--alpha", type=float, nargs="+", required=True, help="one or more α in [0,1]")
    p.add_argument("--output", "-o", required=True, help="output folder (one sub-folder per α)")
    p.set_defaults(func=_cmd)


def _cmd(args, extra) -> int:
    if extra:
        raise UserError(f"unexpected arguments: {' '.join(extra)}")
    for alpha in args.alpha:
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"--alpha {alpha}: α must lie in [0, 1]")
    several = len(args.alpha) > 1
    for alpha in args.alpha:
        out = Path(args.output) / f"alpha-{alpha:g}" if several else Path(args.output)
        _write(args.a, args.b, alpha, out)
        print(f"α={alpha:g}: {out}")
    return 0


def _write(a, b, alpha, out):
    from mmtune.interpolate import write_interpolated

    write_interpolated(a, b, alpha, out)
