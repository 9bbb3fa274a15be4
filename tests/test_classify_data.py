"""Classification data: ImageFolder, CSV labels, digits-shift, and one clear error per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmtune.cli import main
from tests.conftest import one_line_error, tiny_overrides, write_image

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "classify-digits.yaml"


def _image_folder(root: Path, classes: dict[str, int]) -> Path:
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        colour = (220, 20, 20) if name.startswith("r") else (20, 20, 220)
        for i in range(n):
            write_image(root / name / f"{i}.png", color=colour)
    return root


def _classify(tmp_path, *extra) -> list[str]:
    over = tiny_overrides(
        tmp_path, **{"data.batch_size": 4, "train.max_steps": 2, "data.shift": "[]", "options.compare": "[finetune]"}
    )
    return ["classify", "--config", str(CONFIG), *[f"{k}={v}" for k, v in over.items()], *extra]


def test_image_folder_trains_and_reports(tmp_path):
    train = _image_folder(tmp_path / "train", {"red": 8, "blue": 8})
    val = _image_folder(tmp_path / "val", {"red": 2, "blue": 3})
    args = _classify(
        tmp_path, f"data.dataset={train}", f"data.val={val}", f"data.test={val}", "data.format=imagefolder"
    )
    assert main(args) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "finetune.test.top1" in m
    table = json.loads((tmp_path / "run" / "finetune" / "tables" / "per_class.json").read_text())
    assert [row[0] for row in table["rows"]] == ["blue", "red"]  # sorted folder names
    assert [row[1] for row in table["rows"]] == [3, 2]  # test support per class


def test_image_folder_with_an_empty_class_folder(tmp_path, capsys):
    train = _image_folder(tmp_path / "train", {"red": 4, "blue": 4})
    (train / "green").mkdir()
    args = _classify(tmp_path, f"data.dataset={train}", "data.format=imagefolder")
    assert main(args) == 2
    one_line_error(capsys, "'green'", "no images")


def test_a_single_class_dataset(tmp_path, capsys):
    train = _image_folder(tmp_path / "train", {"red": 6})
    assert main(_classify(tmp_path, f"data.dataset={train}", "data.format=imagefolder")) == 2
    one_line_error(capsys, "single class", "'red'")


def test_csv_label_outside_the_class_list(tmp_path, capsys):
    for i in range(8):
        write_image(tmp_path / f"{i}.png")
    (tmp_path / "train.csv").write_text(
        "image,label\n" + "".join(f"{i}.png,{'cat' if i % 2 else 'dog'}\n" for i in range(6))
    )
    (tmp_path / "val.csv").write_text("image,label\n6.png,cat\n7.png,horse\n")
    args = _classify(
        tmp_path,
        f"data.dataset={tmp_path / 'train.csv'}",
        f"data.val={tmp_path / 'val.csv'}",
        "data.label_column=label",
        "data.caption_column=null",
    )
    assert main(args) == 2
    one_line_error(capsys, "val.csv", "'horse'", "['cat', 'dog']")


def test_a_checkpoint_without_an_image_tower(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(bert)
    assert main(_classify(tmp_path, f"model.name={bert}")) == 2
    one_line_error(capsys, "no image tower", str(bert))


def test_digits_shift_is_fixed_and_built_from_the_test_split():
    from mmtune.data.builtin import digits
    from mmtune.data.builtin.digits_shift import CORRUPTIONS, shift_records

    a, b = shift_records(0), shift_records(0)
    test = digits.digits_splits(0)["test"]
    assert len(a) == len(CORRUPTIONS) * len(test) == 4 * 360
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    inverted = [r for r in a if "/invert/" in r.id]
    for rec, clean in zip(inverted, test, strict=True):
        assert rec.label == clean.label
        assert np.array_equal(rec.image, 255 - clean.image)
    rotated = [r for r in a if "/rotate/" in r.id]
    changed = np.mean([not np.array_equal(r.image, c.image) for r, c in zip(rotated, test, strict=True)])
    assert changed > 0.95
