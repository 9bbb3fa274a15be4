"""Data: splits of records from built-in sets or files, bad-sample screening, the torch Dataset."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mmtune.data.formats import (
    Record,
    Table,
    detect_format,
    read_caption_folder,
    read_coco,
    read_image_folder,
    read_table,
)
from mmtune.data.images import BadImage, ImageTransform, load_image
from mmtune.data.prompts import ClassNames, labels_from_captions, read_classnames, relabel
from mmtune.data.video import is_video, probe_video, read_msrvtt, sniff_msrvtt
from mmtune.errors import DataError

log = logging.getLogger("mmtune.data")

__all__ = ["Record", "Splits", "ImageTextDataset", "load_splits", "screen", "BadImage"]


@dataclass
class Splits:
    """The records of each split, with class names and prompt templates where known.

    `classes` are the names prompts and tables show; `class_keys` the folder names / label values
    they stand for, where `data.classnames` gave other display names (else None: the same)."""

    train: list[Record]
    val: list[Record]
    test: list[Record]
    classes: list[str] | None = None
    train_templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    eval_templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    skipped: Counter = field(default_factory=Counter)
    name: str = ""
    class_keys: list[str] | None = None

    def get(self, split: str) -> list[Record]:
        return getattr(self, split)

    @property
    def keys(self) -> list[str] | None:
        """The folder names / label values of the classes, in class order."""
        return self.class_keys or self.classes

    def template_sets(self) -> dict[str, list[str]]:
        """The dataset's own prompt sets by `options.templates` name."""
        return {"eval": self.eval_templates, "train": self.train_templates}


def _builtin(name: str, seed: int) -> Splits | None:
    if name == "digits":
        from mmtune.data.builtin import digits

        parts = digits.digits_splits(seed)
        return Splits(
            parts["train"],
            parts["val"],
            parts["test"],
            classes=list(digits.CLASSES),
            train_templates=list(digits.TRAIN_TEMPLATES),
            eval_templates=list(digits.EVAL_TEMPLATES),
            name="digits",
        )
    if name in ("shapes", "shapes-mini"):
        from mmtune.data.builtin import shapes

        parts = shapes.shapes_splits(name, seed)
        return Splits(parts["train"], parts["val"], parts["test"], name=name)
    if name in ("shapes-gen", "shapes-gen-mini"):
        from mmtune.data.builtin import shapes_gen

        parts = shapes_gen.shapes_gen_splits(name, seed)
        return Splits(parts["train"], parts["val"], parts["test"], name=name)
    if name in ("shapes-video", "shapes-video-mini"):
        from mmtune.data.builtin import shapes_video

        parts = shapes_video.shapes_video_splits(name, seed)
        templates = list(shapes_video.TEMPLATES)
        return Splits(
            parts["train"],
            parts["val"],
            parts["test"],
            classes=list(shapes_video.CLASSES),
            train_templates=templates,
            eval_templates=templates,
            name=name,
        )
    return None


def _read(path: str, data_cfg, classes=None, source=None) -> Table:
    from mmtune.data.conversations import read_conversations, sniff_conversations
    from mmtune.data.vqa_formats import read_vqa, sniff_vqa

    if data_cfg.format == "conversations" or (data_cfg.format == "auto" and sniff_conversations(path)):
        return read_conversations(path, data_cfg.image_root)  # LLaVA conversations / messages
    if data_cfg.format in ("auto", "jsonl") and sniff_vqa(path):  # questions: VQA v2 / JSONL
        return read_vqa(path, data_cfg.image_root)
    if data_cfg.format == "msrvtt" or (data_cfg.format == "auto" and sniff_msrvtt(path)):
        return read_msrvtt(path, data_cfg.image_root)  # video_id + captions
    fmt = detect_format(path) if data_cfg.format == "auto" else data_cfg.format
    if fmt == "coco":
        return read_coco(path, data_cfg.image_root)
    if fmt == "folder":
        return read_caption_folder(path)
    if fmt == "imagefolder":
        return read_image_folder(path, classes, source)
    return read_table(
        path,
        fmt,
        image_column=data_cfg.image_column,
        caption_column=data_cfg.caption_column,
        label_column=data_cfg.label_column,
        image_root=data_cfg.image_root,
        classes=classes,
        source=source,
    )


def load_splits(data_cfg, seed: int = 0) -> Splits:
    """Build train/val/test from `data.dataset` (built-in name or path), `data.val`, `data.test`;
    classes in the order of `data.classnames`, or labels from captions by `data.label_pattern`."""
    names = read_classnames(data_cfg.classnames)
    builtin = _builtin(data_cfg.dataset, data_cfg.split_seed)
    if builtin is None:
        splits = _read_splits(data_cfg, seed, names)
    elif names is not None and builtin.classes is not None and not data_cfg.label_pattern:
        relabel(builtin.train + builtin.val + builtin.test, builtin.classes, names, builtin.name)
        builtin.classes = names.keys
        splits = builtin
    else:
        splits = builtin
    parts = (splits.train, splits.val, splits.test)
    if data_cfg.label_pattern:
        source = names.source if names else "data.classnames"
        keys = names.keys if names else None
        splits.classes = labels_from_captions(parts, data_cfg.label_pattern, keys, source, splits.name)
    elif names is not None and splits.classes is None:
        raise DataError(
            f"data.classnames: {splits.name} has no class labels (use data.format=imagefolder, "
            "data.label_column or data.label_pattern)"
        )
    if names is not None and names.names != names.keys:
        splits.classes, splits.class_keys = list(names.names), list(names.keys)
    return splits


def _read_splits(data_cfg, seed: int, names: ClassNames | None) -> Splits:
    if not Path(data_cfg.dataset).exists():
        raise DataError(f"data.dataset: '{data_cfg.dataset}' is neither a built-in (digits, shapes) nor a file")
    keys, source = (names.keys, names.source) if names else (None, None)
    main = _read(data_cfg.dataset, data_cfg, keys, source)
    skipped = Counter(main.skipped)
    records = main.records
    if data_cfg.val:
        val_t = _read(data_cfg.val, data_cfg, main.classes, source)
        train, val = records, val_t.records
        skipped.update(val_t.skipped)
    else:
        order = np.random.default_rng(seed).permutation(len(records))
        n_val = int(round(len(records) * data_cfg.val_fraction))
        val = [records[i] for i in sorted(order[:n_val])]
        train = [records[i] for i in sorted(order[n_val:])]
    test: list[Record] = []
    if data_cfg.test:
        test_t = _read(data_cfg.test, data_cfg, main.classes, source)
        test = test_t.records
        skipped.update(test_t.skipped)
    splits = Splits(train, val, test, classes=main.classes, skipped=skipped, name=data_cfg.dataset)
    if not train:
        raise DataError(f"{data_cfg.dataset}: no training records")
    return splits


def screen(
    records: list[Record],
    on_bad_sample: str = "skip",
    max_pixels: int = 40_000_000,
    max_bad_fraction: float = 1.0,
    desc: str = "checking images",
    found: list[dict] | None = None,
    max_video_seconds: float = 600.0,
) -> tuple[list[Record], Counter]:
    """Decode every file image once (probe every video: header, packets, first frame); drop bad
    ones (counted by reason) or stop naming the file.

    `found`, when given, receives {"sample", "reason", "detail"} for every bad sample, in order.
    """
    good, bad = [], Counter()
    paths = [r for r in records if isinstance(r.image, str)]
    bar = tqdm(records, desc=desc, disable=len(paths) < 200, leave=False)
    for rec in bar:
        reason, detail = None, ""
        if isinstance(rec.image, str):
            try:
                if is_video(rec.image):
                    probe_video(rec.image, max_video_seconds, max_pixels)
                else:
                    load_image(rec.image, max_pixels)
            except BadImage as e:
                if on_bad_sample == "error":
                    raise DataError(f"bad image {e.path}: {e.reason} {e.detail}".rstrip()) from None
                reason, detail = e.reason, e.detail
                if not bad:
                    log.warning("skipping bad image %s (%s); further skips are counted", e.path, e.reason)
        if reason is None:
            # readers decode with errors="replace": U+FFFD marks bytes that were not UTF-8
            caps = [c for c in rec.captions if c and c.strip() and "\ufffd" not in c]
            if rec.captions and not caps:
                blank = all(not c or not c.strip() for c in rec.captions)
                reason = "empty_caption" if blank else "caption_not_utf8"
            rec.captions = caps
        if reason:
            bad[reason] += 1
            if found is not None:
                found.append(
                    {"sample": rec.image if isinstance(rec.image, str) else rec.id, "reason": reason, "detail": detail}
                )
        else:
            good.append(rec)
    if records and sum(bad.values()) / len(records) > max_bad_fraction:
        raise DataError(
            f"{sum(bad.values())} of {len(records)} samples are bad ({dict(bad)}), "
            f"more than data.max_bad_fraction={max_bad_fraction}"
        )
    if bad:
        log.warning("skipped %d bad samples: %s", sum(bad.values()), dict(bad))
    return good, bad


class ImageTextDataset(torch.utils.data.Dataset):
    """Records → dicts {pixel_values (3,S,S), caption, captions, label, index}; None for a bad image.

    Caption choice and augmentation draw from a Generator seeded by (seed, epoch, index): the
    same sample is identical whichever worker makes it.
    """

    def __init__(self, records, transform: ImageTransform, seed: int = 0, max_pixels=40_000_000):
        self.records, self.transform, self.seed, self.max_pixels = (
            records,
            transform,
            seed,
            max_pixels,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict | None:
        return self.item(self.records[i], np.random.default_rng([self.seed, self.epoch, i]), i)

    def item(self, rec, rng: np.random.Generator, index: int) -> dict | None:
        """The dict of `rec`, drawing from `rng`; None for a bad image."""
        try:
            img = load_image(rec.image, self.max_pixels, draft=self.transform.decode_size)
        except BadImage as e:
            log.warning("bad image at load time: %s", e)
            return None
        caption = rec.captions[int(rng.integers(len(rec.captions)))] if rec.captions else ""
        return {
            "pixel_values": self.transform(img, rng),
            "caption": caption,
            "captions": rec.captions,
            "label": -1 if rec.label is None else rec.label,
            "index": index,
        }
