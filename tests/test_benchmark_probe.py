"""`mmtune eval --benchmark B --task linear_probe`, multi-label mean average precision, and the
suite's report.html.

Layouts written here, as CLIP_benchmark lays them out: a classification benchmark with train and
test splits (`mmtune data benchmark digits --split train --split test`), and a multi-label one —
test/N.tar of `sNNNNNNN.png` + `sNNNNNNN.npy` (a multi-hot vector, np.save format, as
CLIP_benchmark's webdataset_builder writes voc2007_multilabel) or `.cls` listing several indices.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mmtune.cli import main
from mmtune.data.builtin.digits import CLASSES, digits_splits


@pytest.fixture(scope="module")
def probe_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    assert main(["data", "benchmark", "digits", "-o", str(root / "digits"), "--split", "train", "--split", "test"]) == 0
    return root / "digits"


def _model_and_features(bench_path):
    """The tiny-clip model as `evaluate_model` builds it, and image features of each split."""
    from mmtune.api import set_seed
    from mmtune.config import load_config
    from mmtune.suite import EVAL_TASK, BenchmarkSpec, load_benchmark
    from mmtune.tasks import Context, get_task
    from mmtune.tasks.contrastive import embed_images

    cfg = load_config(None, {"task": EVAL_TASK, "model.name": "tiny-clip"})
    bench = load_benchmark(BenchmarkSpec(path=str(bench_path), task="linear_probe"), cfg)
    set_seed(cfg.seed)
    task = get_task(cfg.task)(Context(cfg, bench.splits, torch.device("cpu")))
    model = task.build().eval()
    with torch.no_grad():
        x = {s: embed_images(model, bench.splits.get(s), task.ctx, task.processor) for s in ("train", "test")}
    y = {s: torch.tensor([r.label for r in bench.splits.get(s)]) for s in x}
    return cfg, x, y


def test_linear_probe_acc1_equals_probe_fitted_by_hand(probe_bench, tmp_path):
    """The benchmark's acc1 is the probe fitted here on the same features: C chosen on a seeded
    20% of train (the folder has no val split), refitted on all of train, scored on test."""
    from mmtune.models.linear_probe import C_GRID, fit_logistic, sweep

    out = tmp_path / "lp.json"
    args = ["eval", "--benchmark", str(probe_bench), "--model", "tiny-clip", "--task", "linear_probe", "-o", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "linear_probe" and result["dataset"] == "digits"
    m = result["metrics"]
    cfg, x, y = _model_and_features(probe_bench)
    order = torch.randperm(len(y["train"]), generator=torch.Generator().manual_seed(cfg.seed))
    held, kept = order[: round(0.2 * len(order))], order[round(0.2 * len(order)) :]
    res = sweep(x["train"][kept], y["train"][kept], x["train"][held], y["train"][held], len(CLASSES), C_GRID)
    xs, ys = torch.cat([x["train"][kept], x["train"][held]]), torch.cat([y["train"][kept], y["train"][held]])
    w, b = fit_logistic(xs, ys, len(CLASSES), res.c, (res.weight, res.bias))
    pred = (x["test"] @ w.T + b).argmax(1)
    assert m["linear_probe.C"] == res.c
    assert (
        m["acc1"] == m["lp_acc1"] == m["linear_probe.top1"] == pytest.approx(float((pred == y["test"]).float().mean()))
    )
    recall = np.mean([float((pred[y["test"] == c] == c).float().mean()) for c in y["test"].unique()])
    assert m["mean_per_class_recall"] == pytest.approx(recall)
    assert m["acc1"] > 0.2  # far above chance (0.1): the probe learnt something on random features
    assert m["data.samples"] == len(y["test"]) and m["linear_probe.train_samples"] == len(y["train"])


def test_linear_probe_needs_a_train_split(tmp_path, capsys):
    """A benchmark with only a test split: one line naming the missing train split."""
    bench = tmp_path / "only-test"
    assert main(["data", "benchmark", "digits", "-o", str(bench)]) == 0
    capsys.readouterr()
    assert main(["eval", "--benchmark", str(bench), "--model", "tiny-clip", "--task", "linear_probe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmtune: error: benchmark only-test") and "needs a train split" in err
    assert "\n" not in err


def _multilabel_bench(folder, records, n_classes: int, npy: bool) -> list[tuple[int, ...]]:
    """CLIP_benchmark's multi-label layout; each sample's classes are its digit and (digit+3)%C."""
    from mmtune.data.benchmark import CLASSNAMES, TEMPLATES

    (folder / "test").mkdir(parents=True)
    (folder / CLASSNAMES).write_text("".join(f"{c}\n" for c in CLASSES[:n_classes]))
    (folder / TEMPLATES).write_text("a photo of the number {c}.\n")
    (folder / "dataset_type.txt").write_text("multilabel\n")
    truth = []
    with tarfile.open(folder / "test" / "0.tar", "w") as tar:
        for i, rec in enumerate(records):
            classes = tuple(sorted({rec.label % n_classes, (rec.label + 3) % n_classes}))
            truth.append(classes)
            buf = io.BytesIO()
            Image.fromarray(rec.image).save(buf, "PNG")
            if npy:
                hot = np.zeros(n_classes, dtype=np.int64)
                hot[list(classes)] = 1
                label = io.BytesIO()
                np.save(label, hot)
                members = {"png": buf.getvalue(), "npy": label.getvalue()}
            else:
                members = {"png": buf.getvalue(), "cls": ",".join(map(str, classes)).encode()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "test" / "nshards.txt").write_text("1\n")
    return truth


@pytest.mark.parametrize("npy", [True, False], ids=["npy", "cls"])
def test_multilabel_map_is_sklearns_average_precision_per_class(tmp_path, npy):
    """mean_average_precision equals scikit-learn's average_precision_score per class, averaged,
    on the zero-shot scores of the same model."""
    from sklearn.metrics import average_precision_score

    from mmtune.api import set_seed
    from mmtune.config import load_config
    from mmtune.suite import EVAL_TASK, BenchmarkSpec, load_benchmark
    from mmtune.tasks import Context, get_task
    from mmtune.tasks.contrastive import embed_images, zeroshot_classifier

    records = digits_splits(0)["test"][:60]
    truth = _multilabel_bench(tmp_path / "ml", records, 10, npy)
    out = tmp_path / "ml.json"
    assert main(["eval", "--benchmark", str(tmp_path / "ml"), "--model", "tiny-clip", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot_classification"
    m = result["metrics"]
    assert m["data.samples"] == 60 and "acc1" not in m
    cfg = load_config(None, {"task": EVAL_TASK, "model.name": "tiny-clip"})
    bench = load_benchmark(BenchmarkSpec(path=str(tmp_path / "ml")), cfg)
    assert [r.labels for r in bench.splits.test] == truth
    set_seed(cfg.seed)
    task = get_task(cfg.task)(Context(cfg, bench.splits, torch.device("cpu")))
    model = task.build().eval()
    with torch.no_grad():
        img = embed_images(model, bench.splits.test, task.ctx, task.processor)
        w = zeroshot_classifier(model, bench.splits.classes, bench.splits.eval_templates, task.ctx, task.processor)
    scores = (img @ w.T).numpy()
    hot = np.zeros(scores.shape, dtype=int)
    for i, classes in enumerate(truth):
        hot[i, list(classes)] = 1
    expected = np.mean([average_precision_score(hot[:, k], scores[:, k]) for k in range(10)])
    assert m["mean_average_precision"] == m["zeroshot.mean_average_precision"] == pytest.approx(expected, abs=1e-9)


def test_average_precision_with_ties_matches_sklearn():
    """Tied scores count together, as scikit-learn's average_precision_score counts them."""
    from sklearn.metrics import average_precision_score

    from mmtune.metrics import average_precision_per_class

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 3)).astype(float)  # many ties
    hot = rng.random((50, 3)) < 0.4
    ap = average_precision_per_class(scores, hot)
    assert ap == pytest.approx([average_precision_score(hot[:, k], scores[:, k]) for k in range(3)])


def test_suite_writes_report_html_with_table_and_plot(probe_bench, tmp_path, capsys):
    """report.html: one self-contained page holding every figure of the table and the SVG plot,
    for a suite with a linear-probe benchmark beside a zero-shot one."""
    suite = tmp_path / "s.yaml"
    suite.write_text(
        f"models: [tiny-clip, {{model: tiny-clip, name: again}}]\n"
        f"benchmarks:\n  - {{path: {probe_bench}, name: zs}}\n"
        f"  - {{path: {probe_bench}, name: lp, task: linear_probe}}\n"
    )
    out = tmp_path / "out"
    assert main(["eval", "--suite", str(suite), "-o", str(out)]) == 0
    table = json.loads((out / "table.json").read_text())
    assert {(r["benchmark"], r["task"]) for r in table["rows"]} == {
        ("zs", "zeroshot_classification"),
        ("lp", "linear_probe"),
    }
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<script" not in html and "src=" not in html
    assert html.count("<svg") == 1 and html.count("<title>") == 1 + len(table["rows"]) * 2
    for row in table["rows"]:
        for v in row["values"].values():
            assert f"<td>{v:.4f}</td>" in html
    assert html.count("<tr>") == len(table["rows"]) + 1
