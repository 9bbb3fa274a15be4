"""Report examples: the most confident right and wrong test predictions, with thumbnails.

Before, the report showed no example images at all. Each check goes back to the data and the
model: a row's true class is the test record's own label, a classify row's prediction and
probability are what `mmtune predict` (the task's `predict`) gives for that image, a zero-shot
row's are recomputed from the model's embeddings here, and the counts follow from top1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmtune import api
from mmtune.config import load_config
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-step contrastive run of tiny-clip on digits, and a 2-step classify run from it."""
    root = tmp_path_factory.mktemp("examples")
    contrastive = load_config(None, tiny_overrides(root, name="contrastive", **{"train.max_steps": 3}))
    api.train(contrastive)
    over = {"model.name": str(contrastive.run_dir), "output_dir": str(root), "name": "classify"}
    classify = load_config(ROOT / "configs" / "tiny" / "classify.yaml", {**over, "train.max_steps": 2})
    api.train(classify)
    return {"contrastive": contrastive, "classify": classify}


def _examples(run_dir: Path, name: str) -> list[dict]:
    spec = json.loads((run_dir / "examples" / f"{name}.json").read_text())
    assert spec["columns"] == ["id", "true", "predicted", "probability", "p(true)", "image"]
    return [dict(zip(spec["columns"], row, strict=True)) for row in spec["rows"]]


def _check_sets(cfg, prefix: str, top1: float) -> tuple[list[dict], list[dict]]:
    """Both sets: thumbnails exist, true classes are the records' labels, right/wrong as named,
    sorted by confidence, as many as top1 says (8 at most)."""
    splits = api.build_data(cfg)
    test = {r.id: r for r in splits.test}
    right, wrong = _examples(cfg.run_dir, f"{prefix}correct"), _examples(cfg.run_dir, f"{prefix}wrong")
    n_right = round(top1 * len(splits.test))
    assert (len(right), len(wrong)) == (min(8, n_right), min(8, len(splits.test) - n_right))
    for rows, is_right in ((right, True), (wrong, False)):
        assert [r["probability"] for r in rows] == sorted((r["probability"] for r in rows), reverse=True)
        for r in rows:
            assert r["true"] == splits.classes[test[r["id"]].label]
            assert (r["true"] == r["predicted"]) is is_right
            assert r["probability"] >= r["p(true)"]
            with Image.open(cfg.run_dir / r["image"]) as im:
                assert max(im.size) <= 96
    return right, wrong


def _report_shows(cfg, rows: list[dict], title: str) -> None:
    html = (cfg.run_dir / "report.html").read_text()
    assert "<h2>Examples</h2>" in html and title in html
    for r in rows:
        assert f"id: {r['id']}<br>true: {r['true']}<br>predicted: {r['predicted']}" in html


def test_contrastive_run_reports_zero_shot_and_retrieval_examples(runs):
    from mmtune.data.images import load_image
    from mmtune.runs import open_run
    from mmtune.tasks.contrastive import caption_groups

    cfg = runs["contrastive"]
    metrics = json.loads((cfg.run_dir / "metrics.json").read_text())
    right, wrong = _check_sets(cfg, "zeroshot_", metrics["zeroshot.top1"])
    assert wrong, "a 3-step tiny model gets some digits wrong"
    _report_shows(cfg, right + wrong, "Most confident wrong (zero-shot)")
    # the top wrong row, recomputed: prompt embeddings averaged per class, softmax of scale × cosine
    splits = api.build_data(cfg)
    task, model = open_run(cfg.run_dir, cfg, splits)
    proc = task.processor
    record = next(r for r in splits.test if r.id == wrong[0]["id"])
    with torch.no_grad():
        img = model.encode_image(proc.images([load_image(record.image)]))
        per_class = []
        for c in splits.classes:
            t = model.encode_text(**proc.tokenize([tpl.format(c) for tpl in splits.eval_templates]))
            per_class.append(F.normalize(F.normalize(t, dim=-1).mean(0), dim=-1))
        probs = (model.scale() * img @ torch.stack(per_class).T).softmax(-1)[0]
    assert splits.classes[int(probs.argmax())] == wrong[0]["predicted"]
    assert float(probs.max()) == pytest.approx(wrong[0]["probability"], abs=1e-3)
    # retrieval: four caption queries × their three best images, in score order
    spec = json.loads((cfg.run_dir / "examples" / "retrieval.json").read_text())
    rows = [dict(zip(spec["columns"], row, strict=True)) for row in spec["rows"]]
    assert len(rows) == 12 and [r["rank"] for r in rows[:3]] == [1, 2, 3]
    assert rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"]
    index = {r.id: i for i, r in enumerate(splits.test)}
    texts, text_groups, image_groups = caption_groups(splits.test)  # which captions match which images
    assert len({text_groups[texts.index(r["query"])] for r in rows}) == 4  # four unrelated queries
    for r in rows:
        assert r["relevant"] == (text_groups[texts.index(r["query"])] == image_groups[index[r["id"]]])
        assert (cfg.run_dir / r["image"]).is_file()
    with torch.no_grad():  # the first hit's score: the cosine of the query and the image
        q = model.encode_text(**proc.tokenize([rows[0]["query"]]))
        hit = model.encode_image(proc.images([load_image(splits.test[index[rows[0]["id"]]].image)]))
    assert float(q @ hit.T) == pytest.approx(rows[0]["score"], abs=1e-3)


def test_classify_run_reports_examples_that_predict_agrees_with(runs):
    from mmtune.data.images import load_image
    from mmtune.runs import open_run

    cfg = runs["classify"]
    metrics = json.loads((cfg.run_dir / "metrics.json").read_text())
    right, wrong = _check_sets(cfg, "", metrics["top1"])
    assert right or wrong
    _report_shows(cfg, right + wrong, "Most confident")
    splits = api.build_data(cfg)
    task, model = open_run(cfg.run_dir, cfg, splits)
    test = {r.id: r for r in splits.test}
    rows = right + wrong
    outs = task.predict(model, [{"image": load_image(test[r["id"]].image)} for r in rows])
    for r, out in zip(rows, outs, strict=True):
        p = np.asarray(out["probs"])
        assert out["labels"][int(p.argmax())] == r["predicted"]
        assert float(p.max()) == pytest.approx(r["probability"], abs=1e-3)


def test_report_skips_a_thumbnail_path_outside_the_run(tmp_path):
    """A hand-edited examples file cannot make the report inline a file outside the run folder."""
    from mmtune.report import write_report

    run = tmp_path / "run"
    (run / "examples").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    spec = {"title": "t", "columns": ["id", "image"], "rows": [["a", "../secret.png"], ["b", "nope.png"]]}
    (run / "examples" / "x.json").write_text(json.dumps(spec))
    html = write_report(run).read_text()
    assert "id: a" in html and "id: b" in html and "data:image/png" not in html
