"""`mmtune export`: a run's model as a folder other tools load (the formats its task offers)."""

from __future__ import annotations

from mmtune.cli.common import threads
from mmtune.errors import UserError


def add_parser(sub) -> None:
    x = sub.add_parser("export", help="export to a transformers folder, ONNX or open_clip")
    x.add_argument("checkpoint", help="run folder or checkpoint folder")
    x.add_argument(
        "--format",
        choices=["hf", "onnx", "open-clip"],
        default="hf",
        help="a format the run's task offers (contrastive: hf, onnx, open-clip; vlm-sft: hf)",
    )
    x.add_argument("--output", "-o", required=True, help="new folder to write")
    x.set_defaults(func=cmd_export)


def cmd_export(args, extra) -> int:
    from mmtune.export import export_run

    if extra:
        raise UserError(f"unexpected arguments {extra}")
    threads()
    res = export_run(args.checkpoint, args.output, args.format)
    print(
        f"{args.format} export written to {res['folder']} (max abs difference to PyTorch "
        f"{res['max_abs_diff']:.2e}; {res['merged']} adapter layers merged)"
    )
    return 0
