"""LoRA on the image tower: only adapters train, and merging them changes no prediction."""

from __future__ import annotations

import torch

from mmtune.models.classifier import ImageClassifier
from mmtune.models.load import preset
from mmtune.models.lora import add_lora, has_lora, merge_lora


def _adapted(seed=0):
    torch.manual_seed(seed)
    model, _, _ = preset("tiny-clip")
    clf = ImageClassifier(model, torch.randn(10, 16) * 5)
    base_keys = set(clf.state_dict())
    names = add_lora(clf, model.tower("vision"), r=4, alpha=8.0)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter): make the adapters matter
        for n, p in clf.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return clf, names, base_keys


def test_adapters_go_on_every_image_tower_linear_only():
    clf, names, _ = _adapted()
    fresh = preset("tiny-clip")[0]
    tower_linears = {
        f"backbone.hf.vision_model.{n}"
        for n, m in fresh.hf.vision_model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    assert set(names) == tower_linears and len(names) == 2 * 6  # 2 layers × q k v out fc1 fc2
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_merged_model_predicts_exactly_as_the_unmerged_one():
    clf, _, base_keys = _adapted()
    clf.eval()
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        before = clf(x)
        merge_lora(clf)
        after = clf(x)
    assert not has_lora(clf)
    assert set(clf.state_dict()) == base_keys  # the original architecture and names
    assert torch.equal(before.argmax(1), after.argmax(1))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # and the adapters changed the model: merging is not trivially the identity
    ref, _, _ = _adapted()
    merge_lora(ref)
    fresh = ImageClassifier(preset("tiny-clip")[0], torch.zeros(10, 16))
    fresh.load_state_dict(clf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), after, rtol=1e-5, atol=1e-5)


def test_lora_changes_the_output_relative_to_the_base():
    clf, _, _ = _adapted()
    torch.manual_seed(0)
    base = ImageClassifier(preset("tiny-clip")[0], torch.zeros(10, 16))
    state = {k.replace(".base_layer", ""): v for k, v in clf.state_dict().items() if "lora_" not in k}
    base.load_state_dict(state)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(base.eval()(x), clf.eval()(x), atol=1e-3)
