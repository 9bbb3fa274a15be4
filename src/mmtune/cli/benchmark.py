"""`mmtune data benchmark DATASET -o DIR`: a labelled dataset in CLIP_benchmark's layout."""

from __future__ import annotations


def add_benchmark(dsub) -> None:
    """Register `data benchmark` under the `data` command group."""
    b = dsub.add_parser("benchmark", help="write CLIP_benchmark's WebDataset layout (zero-shot)")
    b.add_argument("dataset", help="labelled dataset: `digits`, an ImageFolder, a pairs file…")
    b.add_argument("--output", "-o", required=True, help="empty folder to write")
    b.add_argument(
        "--split", action="append", choices=["train", "val", "test"], help="split(s) to write (default: test)"
    )
    b.add_argument("--samples-per-shard", type=int, default=10_000)
    b.add_argument("--config", "-c", help="config whose `data` section reads the dataset")
    b.set_defaults(func=cmd_benchmark)


def cmd_benchmark(args, extra) -> int:
    from mmtune.config import load_config, parse_overrides
    from mmtune.data import load_splits, screen
    from mmtune.data.benchmark import write_benchmark

    overrides = parse_overrides(extra)
    overrides["data.dataset"] = args.dataset
    cfg = load_config(args.config, overrides)
    splits = load_splits(cfg.data, cfg.seed)
    chosen = {}
    for name in args.split or ["test"]:
        good, bad = screen(splits.get(name), "skip", cfg.data.max_image_pixels, 1.0, "checking")
        if bad:
            print(f"{name}: left out {sum(bad.values())} bad samples: {dict(bad)}")
        chosen[name] = good
    counts = write_benchmark(chosen, splits.classes, splits.eval_templates, args.output, args.samples_per_shard)
    shown = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"wrote {shown} samples, {len(splits.classes)} classes to {args.output}")
    return 0
