"""`classify` through the CLI on tiny-clip: every method, the comparison, WiSE-FT, the shipped
config through `mmtune train`, freezing policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression

from mmtune.cli import main
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "classify-digits.yaml"
METHODS = ("zeroshot", "linear-probe", "finetune", "lora", "lp-ft", "flyp", "wise-ft")


def _tiny(tmp, **extra) -> list[str]:
    over = tiny_overrides(tmp, name="cmp", **{"train.max_steps": 3, **extra})
    return [f"{k}={v}" for k, v in over.items()]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """One `mmtune classify` run of all seven methods on tiny-clip (a few steps each).

    tiny-clip's random features are barely separable (~40% top-1): weakly regularised probes
    are flat there and any two solvers flip borderline test points, so the grid stops at C=10
    (test_classify_probe covers larger C on separable features).
    """
    tmp = tmp_path_factory.mktemp("classify")
    args = [
        "classify",
        "--config",
        str(CONFIG),
        *_tiny(tmp),
        "options.probe_c_grid=[0.1, 1.0, 10.0]",
        "options.alphas=[0.0, 0.5, 1.0]",
        "options.per_method={}",
        "train.lr=3e-3",
    ]
    assert main(args) == 0
    run = tmp / "cmp"
    return run, json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_every_method_reports_the_comparison_keys(comparison):
    run, m = comparison
    for method in METHODS:
        for key in ("test.top1", "shift.top1", "val.top1", "trainable_params", "train_seconds"):
            assert f"{method}.{key}" in m, f"{method}.{key}"
        assert (run / method / "plots" / "confusion_test.png").is_file(), method
        assert (run / method / "tables" / "per_class.json").is_file(), method
    assert m["wise-ft.alpha"] in (0.0, 0.5, 1.0)
    html = (run / "report.html").read_text()
    assert "Methods compared" in html and "WiSE-FT" in html and "wise_ft_alpha" in html


@pytest.mark.slow
def test_trainable_parameter_counts(comparison):
    _, m = comparison
    assert m["zeroshot.trainable_params"] == 0
    # tiny-clip: 10 classes over a 16-d embedding, weights + biases
    assert m["linear-probe.trainable_params"] == 10 * 16 + 10
    assert 0 < m["lora.trainable_params"] < m["finetune.trainable_params"]
    assert m["wise-ft.trainable_params"] == m["finetune.trainable_params"]


@pytest.mark.slow
def test_wise_ft_endpoints_are_the_zero_shot_and_fine_tuned_models(comparison):
    run, m = comparison
    table = json.loads((run / "tables" / "3_wise_ft.json").read_text())
    rows = {row[0]: dict(zip(table["columns"], row, strict=True)) for row in table["rows"]}
    for split in ("val", "test", "shift"):
        assert rows[0.0][f"{split}.top1"] == pytest.approx(m[f"zeroshot.{split}.top1"], abs=1e-9)
        assert rows[1.0][f"{split}.top1"] == pytest.approx(m[f"finetune.{split}.top1"], abs=1e-9)
    best_val = max(r["val.top1"] for r in rows.values())
    assert rows[m["wise-ft.alpha"]]["val.top1"] == best_val  # chosen on val, not on test


@pytest.mark.slow
def test_each_method_folder_reloads_as_its_reported_model(comparison):
    """The saved checkpoint of every method predicts what the comparison reported."""
    from mmtune.config import load_config
    from mmtune.data import load_splits
    from mmtune.models.classifier import classify_logits, load_classifier
    from mmtune.tasks import Context

    run, m = comparison
    cfg = load_config(run / "config.yaml")
    splits = load_splits(cfg.data)
    ctx = Context(cfg, splits, torch.device("cpu"))
    labels = torch.tensor([r.label for r in splits.test])
    for method in ("linear-probe", "lora", "flyp", "wise-ft"):
        clf, proc, _ = load_classifier(run / method, ctx)
        logits = classify_logits(clf, splits.test, ctx, proc)
        acc = (logits.argmax(1) == labels).double().mean().item()
        assert acc == pytest.approx(m[f"{method}.test.top1"], abs=1e-9), method


@pytest.mark.slow
def test_probe_of_a_comparison_run_matches_sklearn_on_its_cached_features(comparison):
    """The cached features the run's probe saw; same chosen C → same test accuracy (±0.5 pt)."""
    run, m = comparison
    f = load_file(str(run / "linear-probe" / "features.safetensors"))
    ref = LogisticRegression(C=m["linear-probe.C"], max_iter=10_000, tol=1e-10)
    ref.fit(f["train.x"].numpy(), f["train.y"].numpy())
    sk_acc = ref.score(f["test.x"].numpy(), f["test.y"].numpy())
    assert abs(m["linear-probe.test.top1"] - sk_acc) <= 0.005, (m["linear-probe.test.top1"], sk_acc)


def test_shipped_config_trains_its_method_through_train(tmp_path):
    assert main(["train", "--config", str(CONFIG), *_tiny(tmp_path)]) == 0
    m = json.loads((tmp_path / "cmp" / "metrics.json").read_text())
    assert {"top1", "top5", "mean_per_class_recall", "shift.top1", "loss"} <= m.keys()
    assert m["train.steps"] == 3


def test_classifier_loss_is_the_mean_cross_entropy_of_its_logits(tmp_path):
    """`loss` in a classify evaluation: the cross-entropy of the logits `mmtune eval` sees."""
    import torch.nn.functional as F

    from mmtune.data import load_splits
    from mmtune.models.classifier import classify_logits
    from mmtune.runs import open_run, run_config

    assert main(["train", "--config", str(CONFIG), *_tiny(tmp_path), "train.eval_every=0"]) == 0
    cfg = run_config(tmp_path / "cmp" / "model")
    splits = load_splits(cfg.data, cfg.seed)
    task, model = open_run(tmp_path / "cmp", splits=splits)
    recs = splits.get("test")
    got = task.evaluate(model, recs).metrics["loss"]
    logits = classify_logits(task.classifier(model), recs, task.ctx, task.processor)
    want = F.cross_entropy(logits, torch.tensor([r.label for r in recs])).item()
    assert got == pytest.approx(want, rel=1e-5) and 0 < got < 10


def test_lp_ft_alone_fits_its_own_probe_first(tmp_path):
    """Without a linear-probe run to start from, lp-ft's head is the probe it fits on train."""
    from mmtune.checkpoint import read_safetensors

    args = [
        "train",
        "--config",
        str(CONFIG),
        *_tiny(tmp_path),
        "options.method=lp-ft",
        "options.probe_c_grid=[1.0]",
        "train.lr=1e-12",
    ]
    assert main(args) == 0
    run = tmp_path / "cmp"
    head = read_safetensors(run / "checkpoints" / "last" / "model.safetensors")["head.weight"]
    # train.lr≈0 keeps the head where the probe put it: not the zero-shot head (scaled unit rows)
    norms = head.norm(dim=1)
    assert not torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-3)


def test_train_refuses_a_method_without_a_training_loop(tmp_path, capsys):
    args = ["train", "--config", str(CONFIG), *_tiny(tmp_path), "options.method=linear-probe"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmtune: error:") and "mmtune classify" in err and "\n" not in err


def _tiny_classifier():
    from mmtune.models.classifier import ImageClassifier, image_side
    from mmtune.models.load import preset

    model, proc, _ = preset("tiny-clip")
    clf = ImageClassifier(model, torch.randn(10, 16))
    return clf, image_side(model, proc.image_size)


def test_image_side_is_the_vision_tower_and_projection():
    clf, names = _tiny_classifier()
    expected = {
        n for n, _ in clf.backbone.named_parameters() if n.startswith(("hf.vision_model.", "hf.visual_projection."))
    }
    # CLIP's pre-layernorm output and pooled path use every vision parameter
    assert names == expected


def test_unfreeze_top_k_trains_the_top_blocks_projection_and_head():
    from mmtune.models import count_parameters
    from mmtune.models.classifier import set_trainable

    clf, names = _tiny_classifier()
    set_trainable(clf, names, top_k=1)
    expected = sum(
        p.numel()
        for n, p in clf.named_parameters()
        if n.startswith(("backbone.hf.vision_model.encoder.layers.1.", "backbone.hf.visual_projection.", "head."))
    )
    assert count_parameters(clf)[0] == expected


def test_unfreeze_patterns_and_their_errors():
    from mmtune.errors import ConfigError
    from mmtune.models.classifier import set_trainable

    clf, names = _tiny_classifier()
    set_trainable(clf, names, patterns=["*post_layernorm*"])
    trained = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trained == {
        "backbone.hf.vision_model.post_layernorm.weight",
        "backbone.hf.vision_model.post_layernorm.bias",
        "head.weight",
        "head.bias",
    }
    with pytest.raises(ConfigError, match="matches no image-side parameter"):
        set_trainable(clf, names, patterns=["*text_model*"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["finetune", "lora"])
def test_mmtune_eval_of_a_method_folder_matches_the_comparison(comparison, method, tmp_path):
    """`mmtune eval` rebuilds the classifier head (and LoRA) of a classify run folder."""
    run, m = comparison
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run / method), "-o", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["top1"] == pytest.approx(m[f"{method}.test.top1"], abs=1e-9)
