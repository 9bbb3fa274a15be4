"""`mmtune embed | index build | search`: embeddings files, FAISS indexes and queries."""

from __future__ import annotations

import json
from pathlib import Path

from mmtune.cli.common import overrides, threads
from mmtune.errors import UserError


def cmd_embed(args, extra) -> int:
    from mmtune.embed import embed_items, image_items, text_items
    from mmtune.onnx_encoder import maybe_onnx
    from mmtune.runs import load_run

    if not (args.images or args.texts):
        raise UserError("give --images SOURCE and/or --texts SOURCE")
    columns = _columns(args, extra)
    items = []
    if args.images:
        items += image_items(args.images, **columns)
    if args.texts:
        items += text_items(args.texts, **columns)
    threads()
    model, proc = load_run(args.checkpoint)
    model = maybe_onnx(model, proc, args.backend, args.quantize)
    rep = embed_items(
        model,
        proc,
        items,
        args.output,
        args.batch_size,
        args.max_pixels,
        progress=not args.no_progress,
        checkpoint=str(Path(args.checkpoint).resolve()),
    )
    skipped = sum(rep.skipped.values())
    resumed = f", resumed after {rep.resumed_parts} saved parts" if rep.resumed_parts else ""
    print(f"{rep.rows} embeddings written to {rep.output}{resumed}")
    print(f"skipped {skipped}" + (f": {dict(rep.skipped)}" if skipped else ""))
    return 0


def cmd_index_build(args, extra) -> int:
    from mmtune.retrieval import IndexConfig, build_index, load_section, read_embeddings, save_index

    cfg = load_section(args.config, overrides(extra), IndexConfig)
    emb = read_embeddings(args.embeddings, None if args.modality == "all" else args.modality)
    threads()
    index = build_index(emb.vectors, cfg)
    save_index(args.output, index, emb, cfg)
    kind = json.loads((Path(args.output) / "index.json").read_text())["kind"]
    print(f"{kind} index of {len(emb)} vectors ({emb.vectors.shape[1]}-d) written to {args.output}")
    return 0


def cmd_search(args, extra) -> int:
    import numpy as np

    from mmtune.data.images import BadImage, load_image
    from mmtune.retrieval import VectorIndex
    from mmtune.runs import load_run

    if (args.query is None) == (args.image is None):
        raise UserError("give a text query or --image FILE (one of them)")
    index = VectorIndex.load(args.index, nprobe=args.nprobe)
    ckpt = args.checkpoint or index.info.get("checkpoint")
    if not ckpt:
        raise UserError("the index does not name its checkpoint: pass --checkpoint RUN")
    threads()
    model, proc = load_run(ckpt)
    import torch

    with torch.no_grad():
        if args.image:
            try:
                img = load_image(args.image)
            except BadImage as e:
                raise UserError(f"cannot use the query image: {e}") from None
            vec = model.encode_image(proc.images([img]))
        else:
            if not args.query.strip():
                raise UserError("the query text is empty")
            vec = model.encode_text(**proc.tokenize([args.query]))
    hits = index.search(np.asarray(vec.float()), args.k)[0]
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    for h in hits:
        where = h["path"] if h["modality"] == "image" else repr(h["caption"])
        print(f"{h['rank']:>3}  {h['score']:.4f}  {where}")
    return 0


def _columns(args, extra: list[str]) -> dict:
    """The pairs-file columns: --image-column / --caption-column, else `data.*=` overrides, else
    the run's own config (what it was trained on), else the defaults."""
    from mmtune.runs import resolve_checkpoint, run_config

    over = overrides(extra)
    bad = [k for k in over if k not in ("data.image_column", "data.caption_column", "data.image_root")]
    if bad:
        raise UserError(f"embed takes data.image_column, data.caption_column, data.image_root; not {bad[0]}")
    data = run_config(resolve_checkpoint(args.checkpoint)[0], over).data
    return {
        "image_column": args.image_column or data.image_column,
        "caption_column": args.caption_column or data.caption_column,
        "image_root": data.image_root,
    }


def add_backend_args(p) -> None:
    p.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default="torch",
        help="run the encoders on PyTorch or, exported, on ONNX Runtime (faster on CPU)",
    )
    p.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="with --backend onnx: int8 dynamic quantisation of the weights",
    )


def add_parser(sub) -> None:
    e = sub.add_parser("embed", help="embed images and/or texts into a Parquet file")
    e.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    e.add_argument(
        "--images", help="folder of images, pairs file (CSV/TSV/JSONL/COCO), or a shard folder from `mmtune data shard`"
    )
    e.add_argument("--texts", help="text file (one per line) or pairs file (its captions)")
    e.add_argument("--image-column", help="pairs file: the image column (default: the run's data.image_column)")
    e.add_argument("--caption-column", help="pairs file: the caption column (default: the run's data.caption_column)")
    e.add_argument("--output", "-o", required=True, help="Parquet file to write")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--max-pixels", type=int, default=40_000_000, help="refuse larger images")
    e.add_argument("--no-progress", action="store_true")
    add_backend_args(e)
    e.set_defaults(func=cmd_embed)

    ix = sub.add_parser("index", help="build FAISS indexes")
    ixs = ix.add_subparsers(dest="index_command", required=True)
    b = ixs.add_parser("build", help="index an embeddings file (exact by default)")
    b.add_argument("embeddings", help="Parquet file from `mmtune embed`")
    b.add_argument("--output", "-o", required=True, help="index folder to write")
    b.add_argument("--config", "-c", help="index YAML (configs/index-ivf.yaml…); key=value overrides")
    b.add_argument("--modality", choices=["image", "text", "all"], default="image")
    b.set_defaults(func=cmd_index_build)

    s = sub.add_parser("search", help="top-k of an index for a text or an image")
    s.add_argument("index", help="index folder")
    s.add_argument("query", nargs="?", help="query text")
    s.add_argument("--image", help="query image instead of a text")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--checkpoint", help="model (default: the one the index was built with)")
    s.add_argument("--nprobe", type=int, help="IVF lists to visit (overrides the index's)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_search)
