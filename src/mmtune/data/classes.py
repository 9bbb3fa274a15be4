"""Classification data checks, extra evaluation splits (distribution shift), FLYP captions."""

from __future__ import annotations

from pathlib import Path

from mmtune.data import Record, screen
from mmtune.data.formats import detect_format, read_image_folder, read_table
from mmtune.data.prompts import read_classnames, relabel
from mmtune.errors import DataError

SHIFT_BUILTINS = ("digits-shift",)


def check_classes(splits) -> list[str]:
    """The class names; DataError when there are fewer than two or a training record has none."""
    classes = splits.classes
    if not classes:
        raise DataError(
            f"{splits.name or 'dataset'}: no class labels; classification needs a label per "
            "image (data.label_column for CSV/JSONL, or data.format=imagefolder)"
        )
    if len(classes) < 2:
        raise DataError(
            f"{splits.name or 'dataset'}: a single class ({classes[0]!r}); classification needs at least two"
        )
    if any(r.label is None for r in splits.train):
        raise DataError(f"{splits.name}: some training records have no label")
    return list(classes)


def _read(path: str, data_cfg, classes: list[str]) -> list[Record]:
    fmt = data_cfg.format
    if fmt == "imagefolder" or (fmt == "auto" and Path(path).is_dir()):
        return read_image_folder(path, classes, _source(data_cfg)).records
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in ("csv", "tsv", "jsonl"):
        raise DataError(f"data.shift '{path}': use an ImageFolder or a CSV/TSV/JSONL with labels")
    if not data_cfg.label_column:
        raise DataError(f"data.shift '{path}': set data.label_column to read its labels")
    table = read_table(
        path,
        fmt,
        image_column=data_cfg.image_column,
        caption_column=None,
        label_column=data_cfg.label_column,
        image_root=data_cfg.image_root,
        classes=classes,
        source=_source(data_cfg),
    )
    return table.records


def _source(data_cfg) -> str | None:
    """Where the classes were named, for errors: data.classnames, or the training classes."""
    return "data.classnames" if data_cfg.classnames is not None else None


def shift_name(entry: str) -> str:
    """A split's name in metric keys: the built-in name, or the file/folder stem."""
    return entry if entry in SHIFT_BUILTINS else Path(entry).stem


def shift_splits(data_cfg, classes: list[str]) -> dict[str, list[Record]]:
    """`data.shift` entries → {name: records}, labelled with the training classes (their folder
    names / label values, `Splits.keys`), screened."""
    out = {}
    for entry in data_cfg.shift:
        if entry == "digits-shift":
            if data_cfg.dataset != "digits":
                raise DataError("data.shift 'digits-shift' goes with data.dataset=digits")
            from mmtune.data.builtin.digits_shift import shift_records

            records = shift_records(data_cfg.split_seed)
            names = read_classnames(data_cfg.classnames)
            if names is not None:
                from mmtune.data.builtin.digits import CLASSES

                relabel(records, CLASSES, names, "digits-shift")
        elif Path(entry).exists():
            records = _read(entry, data_cfg, classes)
        else:
            raise DataError(
                f"data.shift: '{entry}' is neither a built-in ({', '.join(SHIFT_BUILTINS)}) nor a file or folder"
            )
        good, _ = screen(
            records,
            data_cfg.on_bad_sample,
            data_cfg.max_image_pixels,
            data_cfg.max_bad_fraction,
            shift_name(entry),
        )
        out[shift_name(entry)] = good
    return out


def prompt_records(records: list[Record], classes: list[str], templates: list[str]):
    """Records whose captions are the class prompts of their label (FLYP's training pairs)."""
    return [Record(r.image, [t.format(classes[r.label]) for t in templates], r.label, r.id) for r in records]
