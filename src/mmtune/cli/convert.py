"""`mmtune convert open-clip SRC -o DST`: other libraries' checkpoints as transformers folders."""

from __future__ import annotations


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="convert a checkpoint of another library to transformers")
    csub = c.add_subparsers(dest="convert_command", required=True)
    o = csub.add_parser(
        "open-clip",
        help="open_clip folder (open_clip_config.json + open_clip_model.safetensors) → CLIPModel",
    )
    o.add_argument("source", help="open_clip checkpoint folder")
    o.add_argument("--output", "-o", required=True, help="new folder for the transformers model")
    o.set_defaults(func=cmd_convert_open_clip)


def cmd_convert_open_clip(args, extra) -> int:
    from mmtune.errors import UserError
    from mmtune.models.openclip import convert_open_clip

    if extra:
        raise UserError(f"unexpected arguments {extra}")
    res = convert_open_clip(args.source, args.output)
    print(
        f"wrote a transformers CLIPModel ({res['parameters']:,} parameters, image "
        f"{res['image_size']} px, context {res['context_length']} tokens) to {res['folder']}"
    )
    return 0
