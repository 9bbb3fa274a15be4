"""Data readers, the digits split and bad-sample handling (each case named in its test)."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mmtune.config import load_config
from mmtune.data import load_splits, screen
from mmtune.data.builtin import digits
from mmtune.data.formats import Record, read_caption_folder, read_coco, read_table
from mmtune.data.images import BadImage, ImageTransform, load_image
from mmtune.errors import DataError


def _write_pairs(folder, rows, name, sep):
    path = folder / name
    lines = [sep.join(["image", "caption", "label"])] + [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("name, sep", [("p.csv", ","), ("p.tsv", "\t"), ("p.txt", ";")])
def test_separated_files_detect_separator(pairs_folder, name, sep):
    folder, rows = pairs_folder
    table = read_table(_write_pairs(folder, rows, name, sep), label_column="label")
    assert len(table.records) == 12
    assert table.classes == ["blue", "red"]
    rec = table.records[0]
    assert rec.image == str(folder / rows[0][0])  # relative to the file
    assert rec.captions == [rows[0][1]] and rec.label == 1


def test_jsonl_with_custom_columns_and_merged_captions(pairs_folder):
    folder, rows = pairs_folder
    path = folder / "p.jsonl"
    with open(path, "w") as f:
        for img, cap, _ in rows:
            f.write(json.dumps({"file": img, "text": cap}) + "\n")
        f.write(json.dumps({"file": rows[0][0], "text": "another caption"}) + "\n")
    table = read_table(path, image_column="file", caption_column="text")
    assert len(table.records) == 12
    assert table.records[0].captions == [rows[0][1], "another caption"]


def test_missing_column_lists_the_columns(pairs_folder):
    folder, rows = pairs_folder
    path = _write_pairs(folder, rows, "p.csv", ",")
    with pytest.raises(DataError) as e:
        read_table(path, caption_column="text")
    assert "'text' not found" in str(e.value)
    assert "['image', 'caption', 'label']" in str(e.value)


def test_label_outside_class_list(pairs_folder):
    folder, rows = pairs_folder
    path = _write_pairs(folder, rows, "p.csv", ",")
    with pytest.raises(DataError, match="label 'red' is not one of"):
        read_table(path, label_column="label", classes=["blue", "green"])


def test_coco_captions(pairs_folder):
    folder, rows = pairs_folder
    data = {
        "images": [{"id": i, "file_name": r[0]} for i, r in enumerate(rows)],
        "annotations": [{"image_id": i, "caption": r[1]} for i, r in enumerate(rows)]
        + [{"image_id": 0, "caption": "second"}],
    }
    (folder / "caps.json").write_text(json.dumps(data))
    table = read_coco(folder / "caps.json")
    assert len(table.records) == 12 and table.records[0].captions == [rows[0][1], "second"]
    data["annotations"].append({"image_id": 99, "caption": "x"})
    (folder / "bad.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="unknown image_id"):
        read_coco(folder / "bad.json")


def test_caption_folder(pairs_folder):
    folder, rows = pairs_folder
    for img, cap, _ in rows[:10]:
        (folder / img).with_suffix(".txt").write_text(cap + "\n")
    table = read_caption_folder(folder)
    assert len(table.records) == 10 and table.skipped == {"no_caption": 2}
    assert {r.captions[0] for r in table.records} == {"a red square", "a blue square"}


def test_load_splits_from_files(pairs_folder):
    folder, rows = pairs_folder
    path = _write_pairs(folder, rows, "p.csv", ",")
    cfg = load_config(None, {"data.dataset": str(path), "data.val_fraction": 0.25})
    splits = load_splits(cfg.data)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 0)
    ids = {r.id for r in splits.train} | {r.id for r in splits.val}
    assert len(ids) == 12


def test_digits_split_is_fixed_stratified_and_templates_disjoint():
    a, b = digits.digits_splits(0), digits.digits_splits(0)
    assert [r.id for r in a["test"]] == [r.id for r in b["test"]]
    assert sum(len(v) for v in a.values()) == 1797
    ids = [set(r.id for r in a[s]) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    counts = np.bincount([r.label for r in a["test"]], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of each class (~180 per class)
    train_caps = {c for r in a["train"] for c in r.captions}
    test_caps = {c for r in a["test"] for c in r.captions}
    assert not train_caps & test_caps
    assert not set(digits.TRAIN_TEMPLATES) & set(digits.EVAL_TEMPLATES)
    assert [r.id for r in digits.digits_splits(1)["test"]] != [r.id for r in a["test"]]


# ---------------------------------------------------------------- bad images


def _bomb_png(path, w=20000, h=20000):
    """A ~100-byte PNG whose header declares w×h pixels (no pixel data worth decoding)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def make_bad_files(folder):
    """missing, zero-byte, truncated JPEG, HTML saved as .jpg, decompression bomb."""
    (folder / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    (folder / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "page.jpg").write_text("<html><body>not found</body></html>")
    _bomb_png(folder / "bomb.png")
    return {
        "missing.jpg": "missing",
        "empty.jpg": "empty",
        "trunc.jpg": "truncated",
        "page.jpg": "not_image",
        "bomb.png": "too_large",
    }


def test_each_bad_image_has_its_reason(tmp_path):
    """D1: truncated JPEG, HTML saved as .jpg, zero-byte and missing files each get their
    reason. D2: a ~100-byte PNG declaring 20000×20000 pixels is too_large from its header."""
    for name, reason in make_bad_files(tmp_path).items():
        with pytest.raises(BadImage) as e:
            load_image(str(tmp_path / name))
        assert e.value.reason == reason, name


def test_screen_skips_and_counts_or_stops(tmp_path):
    """D1: bad samples skipped and counted by reason; above max_bad_fraction the run aborts."""
    bad = make_bad_files(tmp_path)
    good = [Record(image=np.zeros((8, 8), np.uint8), captions=["x"])]
    recs = good + [Record(image=str(tmp_path / n), captions=["y"]) for n in bad]
    kept, counts = screen(recs)
    assert kept == good and dict(counts) == {r: 1 for r in bad.values()}
    with pytest.raises(DataError, match="missing.jpg"):
        screen(recs, on_bad_sample="error")
    with pytest.raises(DataError, match="more than data.max_bad_fraction"):
        screen(recs, max_bad_fraction=0.5)


def test_captions_empty_or_whitespace_are_dropped():
    """D4: empty and whitespace-only captions are filtered and counted."""
    recs = [
        Record(np.zeros((8, 8), np.uint8), ["  ", ""]),
        Record(np.zeros((8, 8), np.uint8), ["ok", " "]),
    ]
    kept, counts = screen(recs)
    assert len(kept) == 1 and kept[0].captions == ["ok"] and counts["empty_caption"] == 1


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "L", "I;16", "RGBA"])
def test_image_modes_decode_to_rgb_same_shape(tmp_path, mode):
    """D3: CMYK, palette, LA, 16-bit… decode to RGB with the same tensor shape."""
    base = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), np.uint8))
    img = base.convert("L").convert(mode) if mode in ("LA", "I;16") else base.convert(mode)
    path = tmp_path / f"x.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"
    img.save(path)
    out = load_image(str(path))
    assert out.mode == "RGB" and out.size == (40, 30)
    assert ImageTransform(16)(out).shape == (3, 16, 16)


def test_exif_rotation_is_applied(tmp_path):
    """D3: an EXIF-rotated image is decoded upright."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(str(tmp_path / "r.jpg")).size == (20, 40)


def test_augmentation_is_seeded_per_sample():
    t = ImageTransform(8, augment=True)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (20, 20, 3), np.uint8))
    a = t(img, np.random.default_rng([0, 1, 5]))
    b = t(img, np.random.default_rng([0, 1, 5]))
    c = t(img, np.random.default_rng([0, 1, 6]))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
