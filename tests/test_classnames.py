"""Zero-shot on the user's own classes: data.classnames (order, display names), options.templates
(files, lists, built-in sets), data.label_pattern, and eval / classify / serve honouring them.

Before: classes were always the folder names / label values sorted as text (eight, five, four;
0, 1, 10, 2), own data always got "a photo of a {}.", and caption-only data had no zero-shot.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from mmtune.cli import main
from mmtune.data.images import load_image
from mmtune.data.prompts import OPENAI_IMAGENET, resolve_templates
from tests.conftest import one_line_error, tiny_overrides, write_image

ROOT = Path(__file__).resolve().parents[1]
TINY_CONTRASTIVE = ROOT / "configs" / "tiny" / "contrastive.yaml"
CLASSIFY = ROOT / "configs" / "classify-digits.yaml"
DIGITS = {"four": 4, "five": 5, "eight": 8}  # folder name → digit
TEST_COUNTS = {"four": 2, "five": 3, "eight": 4}  # test images per class: the support to find


def _digit_folder(root: Path, counts: dict[str, int], offset: int) -> Path:
    """An ImageFolder of real handwritten digits (scikit-learn's), upscaled to 32×32 PNGs."""
    from mmtune.data.builtin.digits import load_arrays

    images, labels = load_arrays()
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        idx = np.flatnonzero(labels == DIGITS[name])[offset : offset + n]
        for i in idx:
            Image.fromarray(images[i]).resize((32, 32)).convert("RGB").save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("classnames")
    train = _digit_folder(root / "train", dict.fromkeys(DIGITS, 6), 0)
    test = _digit_folder(root / "test", TEST_COUNTS, 20)
    return root, train, test


def _over(tmp_path, name, **extra) -> list[str]:
    over = tiny_overrides(tmp_path, name=name, **{"data.batch_size": 6, "train.max_steps": 2, **extra})
    return [f"{k}={v}" for k, v in over.items()]


@pytest.fixture(scope="module")
def run(folders):
    """A contrastive tiny-clip run on the digit folders (no data.classnames: sorted order)."""
    root, train, test = folders
    args = _over(root, "zs", **{"data.dataset": train, "data.test": test, "data.format": "imagefolder"})
    args += ["options.retrieval=false"]
    assert main(["train", "--config", str(TINY_CONTRASTIVE), *args]) == 0
    return root / "zs"


def _table(folder: Path, name: str) -> dict:
    return json.loads((folder / "tables" / f"{name}.json").read_text())


def _reference(run: Path, test: Path, keys: list[str], names: list[str], templates: list[str]):
    """Zero-shot predictions computed here: the run's model, each class's mean prompt embedding."""
    from mmtune.runs import load_run

    model, proc = load_run(run)
    paths = [p for k in keys for p in sorted((test / k).glob("*.png"))]
    labels = [keys.index(p.parent.name) for p in paths]
    with torch.no_grad():
        img = model.encode_image(proc.images([load_image(str(p)) for p in paths]))
        txt = model.encode_text(**proc.tokenize([t.format(n) for n in names for t in templates]))
    w = torch.nn.functional.normalize(txt.reshape(len(names), len(templates), -1), dim=-1).mean(1)
    preds = (img @ torch.nn.functional.normalize(w, dim=-1).T).argmax(1)
    cm = np.zeros((len(names), len(names)), dtype=int)
    for y, p in zip(labels, preds.tolist(), strict=True):
        cm[y, p] += 1
    return cm


def test_eval_tables_follow_a_classnames_file(run, folders, tmp_path):
    """Tried: `mmtune eval` with data.classnames naming four, five, eight; before, rows came
    sorted (eight, five, four) and eval wrote no per-class table."""
    _, _, test = folders
    assert [r[0] for r in _table(run, "zeroshot_per_class")["rows"]] == ["eight", "five", "four"]
    names = tmp_path / "classes.txt"
    names.write_text("# the digits in counting order\nfour\n\nfive\neight\n")
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(run), f"data.classnames={names}", "--artifacts", str(out)]
    assert main([*args, "-o", str(tmp_path / "m.json")]) == 0
    per_class = _table(out, "zeroshot_per_class")
    assert [r[0] for r in per_class["rows"]] == ["four", "five", "eight"]
    assert [r[1] for r in per_class["rows"]] == [2, 3, 4]  # support: the images written per class
    confusion = _table(out, "zeroshot_confusion")
    assert confusion["columns"][1:] == ["four", "five", "eight"]
    cm = np.array([row[1:] for row in confusion["rows"]])
    want = _reference(run, test, ["four", "five", "eight"], ["four", "five", "eight"], ["a photo of a {}."])
    np.testing.assert_array_equal(cm, want)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["zeroshot.top1"] == pytest.approx(np.trace(cm) / cm.sum())


def test_list_classnames_display_names_and_template_file(run, folders, tmp_path):
    """A list with `folder: display name` entries and a templates file: the head is built from
    the display names in the templates given (compared with the head computed here)."""
    _, _, test = folders
    templates = tmp_path / "prompts.txt"
    templates.write_text("a handwritten {c}.\n# a comment\n\nthe number {} on paper.\n")
    assert resolve_templates(str(templates), None) == ["a handwritten {}.", "the number {} on paper."]
    mapping = "[eight: the digit eight, 'five: the digit five', four]"
    out = tmp_path / "eval"
    args = [f"data.classnames={mapping}", f"options.templates={templates}", "--artifacts", str(out)]
    assert main(["eval", "--checkpoint", str(run), *args]) == 0
    names = ["the digit eight", "the digit five", "four"]
    confusion = _table(out, "zeroshot_confusion")
    assert [row[0] for row in confusion["rows"]] == names
    want = _reference(run, test, ["eight", "five", "four"], names, ["a handwritten {}.", "the number {} on paper."])
    np.testing.assert_array_equal(np.array([row[1:] for row in confusion["rows"]]), want)


def test_class_folder_missing_from_classnames(run, folders, tmp_path, capsys):
    names = tmp_path / "classes.txt"
    names.write_text("four\nfive\n")
    assert main(["eval", "--checkpoint", str(run), f"data.classnames={names}"]) == 2
    one_line_error(capsys, "'eight'", str(names))


@pytest.mark.parametrize(
    ("text", "needle"),
    [("four\nfive\nfour\n", "'four' is listed twice"), ("a: x\nb: x\n", "'x' is listed twice")],
)
def test_duplicate_classnames(run, tmp_path, capsys, text, needle):
    names = tmp_path / "classes.txt"
    names.write_text(text)
    assert main(["eval", "--checkpoint", str(run), f"data.classnames={names}"]) == 2
    one_line_error(capsys, needle)


def test_missing_classnames_file(run, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(run), f"data.classnames={tmp_path / 'nope.txt'}"]) == 2
    one_line_error(capsys, "data.classnames", "nope.txt")


def test_integer_folders_sort_numerically(tmp_path):
    """Tried: folders 0..11 without data.classnames; before: 0, 1, 10, 11, 2, …"""
    from mmtune.data.formats import read_image_folder

    for i in range(12):
        (tmp_path / str(i)).mkdir()
        write_image(tmp_path / str(i) / "a.png")
    table = read_image_folder(tmp_path)
    assert table.classes == [str(i) for i in range(12)]
    assert [r.label for r in table.records if r.id.startswith("10/")] == [10]


def test_template_sets_and_bad_templates(tmp_path, capsys):
    assert resolve_templates("openai-imagenet", None) == list(OPENAI_IMAGENET)
    assert len(OPENAI_IMAGENET) == 80 == len(set(OPENAI_IMAGENET))
    assert all(t.count("{}") == 1 for t in OPENAI_IMAGENET)
    assert resolve_templates("simple", None) == ["a photo of a {}."]
    assert resolve_templates(["a {c}!", "b {}"], None) == ["a {}!", "b {}"]
    assert resolve_templates("eval", {"eval": ["x {}"], "train": []}) == ["x {}"]
    over = _over(tmp_path, "bad", **{"options.templates": "[a photo of a digit]"})
    assert main(["train", "--config", str(TINY_CONTRASTIVE), *over]) == 2
    one_line_error(capsys, "options.templates", "'a photo of a digit'", "has no '{}'")
    over = _over(tmp_path, "bad2", **{"options.templates": "no-such-set"})
    assert main(["train", "--config", str(TINY_CONTRASTIVE), *over]) == 2
    one_line_error(capsys, "options.templates", "'no-such-set'", "openai-imagenet")


def test_classify_zeroshot_honours_classnames_and_templates(folders, tmp_path):
    """`mmtune classify` (zero-shot) with an 80-template set and a class order; the run records
    them, and `mmtune eval` of a linear head refuses a class order other than the trained one."""
    _, train, test = folders
    over = tiny_overrides(tmp_path, **{"data.shift": "[]", "options.compare": "[zeroshot]"})
    args = [f"{k}={v}" for k, v in over.items()] + [
        f"data.dataset={train}",
        f"data.test={test}",
        "data.format=imagefolder",
        "data.classnames=[five, four, eight]",
        "options.templates=openai-imagenet",
    ]
    assert main(["classify", "--config", str(CLASSIFY), *args]) == 0
    rows = _table(tmp_path / "run" / "zeroshot", "per_class")["rows"]
    assert [r[0] for r in rows] == ["five", "four", "eight"]
    spec = json.loads((tmp_path / "run" / "zeroshot" / "model" / "mmtune_model.json").read_text())
    assert spec["classify"]["templates"] == list(OPENAI_IMAGENET)
    assert spec["classify"]["classes"] == ["five", "four", "eight"]


def test_linear_head_refuses_another_class_order(folders, tmp_path, capsys):
    _, train, test = folders
    over = tiny_overrides(tmp_path, **{"data.shift": "[]", "options.compare": "[linear-probe]"})
    args = [f"{k}={v}" for k, v in over.items()]
    args += [f"data.dataset={train}", f"data.test={test}", "data.format=imagefolder"]
    assert main(["classify", "--config", str(CLASSIFY), *args]) == 0
    probe = tmp_path / "run" / "linear-probe"
    assert main(["eval", "--checkpoint", str(probe), "data.classnames=[eight, five, four]"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(probe), "data.classnames=[four, five, eight]"]) == 2
    one_line_error(capsys, "trained on the classes ['eight', 'five', 'four']", "data.classnames")


def _pairs_csv(folder: Path, captions: list[str]) -> Path:
    from mmtune.data.builtin.digits import load_arrays

    images, labels = load_arrays()
    lines = ["image,caption"]
    for i, cap in enumerate(captions):
        word = cap.split()[-1].rstrip(".")
        digit = DIGITS.get(word, 4)
        idx = np.flatnonzero(labels == digit)[i]
        Image.fromarray(images[idx]).resize((32, 32)).convert("RGB").save(folder / f"{i}.png")
        lines.append(f"{i}.png,{cap}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


def test_label_pattern_gives_zeroshot_on_caption_pairs(tmp_path, caplog):
    """Tried: contrastive training on a pairs CSV without a label column; before, no zero-shot."""
    from mmtune.config import load_config
    from mmtune.data import load_splits

    caps = [f"a photo of a {w}." for w in ["four", "five", "eight"] * 8] + ["a drawing of a four.", "four"]
    csv = _pairs_csv(tmp_path, caps)
    cfg = load_config(None, {"data.dataset": str(csv), "data.label_pattern": "A photo of a {c}."})
    splits = load_splits(cfg.data)
    assert splits.classes == ["eight", "five", "four"]
    recs = splits.train + splits.val
    assert sum(r.label is None for r in recs) == 2
    assert all(splits.classes[r.label] in r.captions[0] for r in recs if r.label is not None)
    assert "2 of 26 records match no caption" in caplog.text
    args = _over(tmp_path, "lp", **{"data.dataset": csv, "data.label_pattern": "'a photo of a {}.'"})
    assert main(["train", "--config", str(TINY_CONTRASTIVE), *args, "data.val_fraction=0.3"]) == 0
    metrics = json.loads((tmp_path / "lp" / "metrics.json").read_text())
    assert "zeroshot.top1" in metrics and "retrieval.i2t.R@1" in metrics


def test_label_pattern_matching_nothing(tmp_path, capsys):
    csv = _pairs_csv(tmp_path, ["a drawing of a four."] * 4)
    args = _over(tmp_path, "none", **{"data.dataset": csv, "data.label_pattern": "'a photo of a {}.'"})
    assert main(["train", "--config", str(TINY_CONTRASTIVE), *args]) == 2
    one_line_error(capsys, "no caption matches data.label_pattern", "'a drawing of a four.'")


def test_serve_classifies_with_the_runs_classes_and_templates(folders, tmp_path):
    """A run trained with its own templates and display names: /v1/classify without labels uses
    them (before: labels were required and taken as raw texts); a serve override replaces them."""
    from mmtune.metrics import zeroshot_weights
    from mmtune.runs import load_run
    from mmtune.serve import Backend, ServeConfig, create_app
    from tests.test_serve import LiveServer

    root, train, test = folders
    templates = ["a scan of a {}.", "the handwritten {}."]
    names = ["the digit four", "the digit five", "the digit eight"]
    extra = {"data.dataset": train, "data.format": "imagefolder", "options.templates": json.dumps(templates)}
    extra["data.classnames"] = "[four: the digit four, five: the digit five, eight: the digit eight]"
    assert main(["train", "--config", str(TINY_CONTRASTIVE), *_over(tmp_path, "served", **extra)]) == 0
    run = tmp_path / "served"
    model, proc = load_run(run)
    path = next((test / "five").glob("*.png"))

    def reference(texts, n_templates):
        with torch.no_grad():
            txt = model.encode_text(**proc.tokenize(texts))
            img = model.encode_image(proc.images([load_image(str(path))]))[0]
        w = zeroshot_weights(txt, len(names), n_templates)
        return (model.scale() * (w @ img)).softmax(-1).detach().numpy()

    backend = Backend.from_run(run)
    with LiveServer(create_app(backend, ServeConfig())) as server:
        r = httpx.post(server.url + "/v1/classify", files={"image": ("q.png", path.read_bytes())})
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == names
    want = reference([t.format(n) for n in names for t in templates], len(templates))
    np.testing.assert_allclose(r.json()["probs"], want, atol=1e-5)
    other = Backend.from_run(run, overrides={"options.templates": "simple"})
    got = other.class_weights
    with torch.no_grad():
        txt = model.encode_text(**proc.tokenize([f"a photo of a {n}." for n in names]))
    np.testing.assert_allclose(got, zeroshot_weights(txt, 3, 1).numpy(), atol=1e-5)


def test_classnames_mapping_forms(tmp_path):
    """A YAML mapping file and an inline mapping (integer keys, as YAML reads `0: zero`)."""
    from mmtune.data.prompts import read_classnames

    (tmp_path / "names.yaml").write_text("n01440764: tench\nn01443537: goldfish\n")
    names = read_classnames(str(tmp_path / "names.yaml"))
    assert (names.keys, names.names) == (["n01440764", "n01443537"], ["tench", "goldfish"])
    names = read_classnames({1: "one", 0: "zero"})
    assert (names.keys, names.names) == (["1", "0"], ["one", "zero"])
