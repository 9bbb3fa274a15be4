"""Layer-wise learning-rate decay: the classifier's scales and the optimizer groups they make."""

import torch

from mmtune.config import ModelConfig
from mmtune.engine import param_groups
from mmtune.models import load_model
from mmtune.models.classifier import ImageClassifier


def _clf(decay):
    model, _ = load_model(ModelConfig(name="tiny-clip"))
    clf = ImageClassifier(model, torch.randn(10, 16))
    clf.layer_decay = decay
    return clf


def test_scales_follow_depth():
    clf = _clf(0.5)
    scales = clf.lr_scales()
    layers = clf.backbone.tower("vision").encoder.layers  # 2 blocks
    name = {id(p): n for n, p in clf.named_parameters()}
    assert {scales[name[id(p)]] for p in layers[1].parameters()} == {0.5}
    assert {scales[name[id(p)]] for p in layers[0].parameters()} == {0.25}
    emb = clf.backbone.tower("vision").embeddings
    assert {scales[name[id(p)]] for p in emb.parameters()} == {0.125}
    assert "head.weight" not in scales  # the head trains at the full rate
    assert not _clf(None).lr_scales()


def test_optimizer_groups_carry_the_scales():
    clf = _clf(0.5)
    groups = param_groups(clf, 0.1, clf.lr_scales())  # what the classify task gives the engine
    by_scale = {}
    for g in groups:
        by_scale[g["lr_scale"]] = by_scale.get(g["lr_scale"], 0) + sum(p.numel() for p in g["params"])
    assert set(by_scale) == {1.0, 0.5, 0.25, 0.125}
    unscaled = _clf(None)
    plain = param_groups(unscaled, 0.1, unscaled.lr_scales())
    assert [g["lr_scale"] for g in plain] == [1.0, 1.0]
    assert sum(by_scale.values()) == sum(sum(p.numel() for p in g["params"]) for g in plain)
