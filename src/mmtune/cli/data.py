"""`mmtune data shard | data check` and `mmtune estimate`: datasets at scale, memory and speed."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="write WebDataset shards, check a dataset")
    dsub = data.add_subparsers(dest="data_command", required=True)

    s = dsub.add_parser("shard", help="write tar shards (image bytes + captions + metadata)")
    s.add_argument("dataset", help="pairs file (CSV/TSV/JSONL), COCO JSON, folder, or `digits`")
    s.add_argument("--out", "-o", required=True, help="empty folder for the shards")
    s.add_argument(
        "--split",
        choices=["train", "val", "test", "all"],
        default="all",
        help="which split to write (`all`: every record of the file)",
    )
    s.add_argument("--samples-per-shard", type=int, default=1000)
    s.add_argument("--config", "-c", help="config whose `data` section reads the dataset")
    s.set_defaults(func=cmd_shard)

    c = dsub.add_parser("check", help="decode every sample; report bad ones by reason")
    c.add_argument(
        "dataset",
        help="shard folder or brace pattern (`shards/{00000..00009}.tar`), pairs file, COCO JSON, folder, or `digits`",
    )
    c.add_argument("--config", "-c", help="config whose `data` section reads the dataset")
    c.add_argument("--list", metavar="FILE", help="write every bad sample (JSON lines: sample, reason, detail)")
    c.set_defaults(func=cmd_check)
    from mmtune.cli.benchmark import add_benchmark  # CLIP_benchmark's layout

    add_benchmark(dsub)

    e = sub.add_parser("estimate", help="predict peak memory and step time; suggest settings")
    e.add_argument("--config", "-c", help="YAML config (defaults when omitted)")
    e.add_argument("--memory-gb", type=float, help="memory budget (default: the device's)")
    e.add_argument("--output", "-o", help="also write the estimate as JSON")
    e.set_defaults(func=cmd_estimate)


def _data_cfg(args, extra):
    from mmtune.config import load_config, parse_overrides

    overrides = parse_overrides(extra)
    overrides["data.dataset"] = args.dataset
    overrides.setdefault("data.val_fraction", 0.0)
    return load_config(args.config, overrides)


def _records(cfg, split: str):
    from mmtune.data import load_splits

    splits = load_splits(cfg.data, cfg.seed)
    parts = ("train", "val", "test") if split == "all" else (split,)
    return [r for p in parts for r in splits.get(p)], splits


SHOWN_BAD = 20  # bad samples named on the terminal; `--list FILE` writes them all


def _print_bad(total: int, bad, found: list[dict] | None = None, list_file: str | None = None) -> int:
    """Counts by reason, then the bad samples themselves (the first SHOWN_BAD; all in `list_file`)."""
    n_bad = sum(bad.values())
    print(f"{total} samples, {total - n_bad} good, {n_bad} bad")
    for reason, count in sorted(bad.items(), key=lambda kv: -kv[1]):
        print(f"  {reason:<20} {count}")
    found = found or []
    if found:
        print("bad samples:")
    for item in found[:SHOWN_BAD]:
        detail = f" ({item['detail']})" if item["detail"] else ""
        print(f"  {item['sample']}  {item['reason']}{detail}")
    if len(found) > SHOWN_BAD:
        more = f"… and {len(found) - SHOWN_BAD} more"
        print(f"  {more}" + ("" if list_file else " (--list FILE writes them all)"))
    if list_file:
        import json

        Path(list_file).write_text("".join(json.dumps(item) + "\n" for item in found))
        print(f"{len(found)} bad samples listed in {list_file}")
    return 1 if n_bad else 0


def cmd_shard(args, extra) -> int:
    from mmtune.data import screen
    from mmtune.data.shards import write_shards

    cfg = _data_cfg(args, extra)
    records, splits = _records(cfg, args.split)
    good, bad = screen(records, "skip", cfg.data.max_image_pixels, 1.0, "checking images")
    bad.update(splits.skipped)
    index = write_shards(good, args.out, args.samples_per_shard, splits.classes)
    print(f"wrote {index['samples']} samples in {len(index['shards'])} shards to {args.out}")
    if bad:
        print(f"left out {sum(bad.values())} bad samples: {dict(bad)}")
    return 0


def cmd_check(args, extra) -> int:
    from mmtune.data.wds import is_shard_source

    if is_shard_source(args.dataset):  # a shard folder, a .tar or a brace pattern
        from mmtune.config import load_config, parse_overrides
        from mmtune.data.shards import check_shards

        cfg = load_config(args.config, parse_overrides(extra))
        found: list[dict] = []
        total, bad = check_shards(args.dataset, cfg.data.max_image_pixels, found)
        return _print_bad(total, bad, found, args.list)
    from mmtune.data import screen

    cfg = _data_cfg(args, extra)
    records, splits = _records(cfg, "all")
    found = []
    _, bad = screen(records, "skip", cfg.data.max_image_pixels, 1.0, "checking images", found)
    bad.update(splits.skipped)  # left out by the reader (COCO images without captions): counted only
    return _print_bad(len(records) + sum(splits.skipped.values()), bad, found, args.list)


def cmd_estimate(args, extra) -> int:
    import json

    from mmtune.config import load_config, parse_overrides
    from mmtune.estimate import estimate, format_estimate

    cfg = load_config(args.config, parse_overrides(extra))
    budget = None if args.memory_gb is None else int(args.memory_gb * 2**30)
    result = estimate(cfg, memory_budget=budget)
    print(format_estimate(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0
