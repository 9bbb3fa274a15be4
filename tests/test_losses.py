"""Contrastive losses checked against loop references, hand-worked values and F.cross_entropy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmtune.losses import caption_group_ids, clip_loss, contrastive_logits, siglip_loss

# image i = unit vector e_i, so similarity (i, j) = TEXT[j, i]: logits [[1, .6], [0, .8]] at scale 1
IMAGE_2 = torch.eye(2, dtype=torch.float64)
TEXT_2 = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)


def _unit(*shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=dtype), dim=-1)


def _loop_clip(img, txt, scale, groups=None):
    """Soft-target symmetric InfoNCE with Python loops over scalar tensors (differentiable)."""
    b = img.shape[0]
    s = [[scale * torch.dot(img[i], txt[j]) for j in range(b)] for i in range(b)]
    pos = [[i == j if groups is None else groups[i] == groups[j] for j in range(b)] for i in range(b)]
    total = 0.0
    for i in range(b):
        lse_row = torch.log(sum(torch.exp(s[i][j]) for j in range(b)))
        pos_row = [j for j in range(b) if pos[i][j]]
        total = total + sum(lse_row - s[i][j] for j in pos_row) / len(pos_row)
        lse_col = torch.log(sum(torch.exp(s[j][i]) for j in range(b)))
        pos_col = [j for j in range(b) if pos[j][i]]
        total = total + sum(lse_col - s[j][i] for j in pos_col) / len(pos_col)
    return total / (2 * b)


def _loop_siglip(img, txt, scale, bias, groups=None):
    """Pairwise sigmoid loss with numpy loops: sum_ij log(1 + exp(-z_ij * l_ij)) / B."""
    img, txt = img.detach().numpy(), txt.detach().numpy()
    b = img.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            logit = scale * float(np.dot(img[i], txt[j])) + bias
            same = i == j if groups is None else groups[i] == groups[j]
            z = 1.0 if same else -1.0
            total += math.log1p(math.exp(-z * logit))
    return total / b


def test_contrastive_logits_matches_loop_with_and_without_bias():
    img, txt = _unit(3, 4, seed=1), _unit(3, 4, seed=2)
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-2.5, dtype=torch.float64)
    plain = contrastive_logits(img, txt, scale)
    biased = contrastive_logits(img, txt, scale, bias)
    assert plain.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            expected = 7.0 * sum(float(img[i, d] * txt[j, d]) for d in range(4))
            assert plain[i, j].item() == pytest.approx(expected, abs=1e-12)
            assert biased[i, j].item() == pytest.approx(expected - 2.5, abs=1e-12)


def test_clip_loss_hand_worked_2x2():
    loss = clip_loss(IMAGE_2, TEXT_2, torch.tensor(1.0, dtype=torch.float64))
    # rows [1, .6], [0, .8] (image->text), columns [1, 0], [.6, .8] (text->image)
    expected = (
        math.log(1 + math.exp(-0.4))
        + math.log(1 + math.exp(-0.8))
        + math.log(1 + math.exp(-1.0))
        + math.log(1 + math.exp(-0.2))
    ) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_clip_loss_hand_worked_2x2_same_group_uses_uniform_targets():
    loss = clip_loss(IMAGE_2, TEXT_2, torch.tensor(1.0, dtype=torch.float64), torch.tensor([4, 4]))
    # target (1/2, 1/2) in every row and column: loss_row = logsumexp(row) - mean(row)
    expected = (
        math.log(math.exp(1.0) + math.exp(0.6))
        - 0.8
        + math.log(1 + math.exp(0.8))
        - 0.4
        + math.log(math.exp(1.0) + 1)
        - 0.5
        + math.log(math.exp(0.6) + math.exp(0.8))
        - 0.7
    ) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_clip_loss_equals_symmetric_cross_entropy():
    img, txt = _unit(6, 5, seed=3, dtype=torch.float32), _unit(6, 5, seed=4, dtype=torch.float32)
    scale = torch.tensor(20.0)
    logits = scale * img @ txt.T
    target = torch.arange(6)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(clip_loss(img, txt, scale), expected)


def test_clip_loss_distinct_groups_equal_plain_loss_exactly():
    img, txt = _unit(6, 5, seed=5, dtype=torch.float32), _unit(6, 5, seed=6, dtype=torch.float32)
    scale = torch.tensor(30.0)
    groups = torch.tensor([5, 0, 3, 1, 2, 4])
    assert torch.equal(clip_loss(img, txt, scale, groups), clip_loss(img, txt, scale))


@pytest.mark.parametrize("groups", [None, [0, 1, 0, 2, 1], [3, 3, 3, 3, 3]])
def test_clip_loss_value_and_gradients_match_loop_reference(groups):
    img = _unit(5, 4, seed=7).requires_grad_(True)
    txt = _unit(5, 4, seed=8).requires_grad_(True)
    scale = torch.tensor(3.0, dtype=torch.float64)
    group_ids = None if groups is None else torch.tensor(groups)
    loss = clip_loss(img, txt, scale, group_ids)
    reference = _loop_clip(img, txt, scale, groups)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-10)
    grads = torch.autograd.grad(loss, (img, txt))
    ref_grads = torch.autograd.grad(reference, (img, txt))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_identical_captions_are_not_pushed_apart():
    # image rows are unit vectors e_i, so d loss / d text[j, i] = d loss / d similarity(i, j)
    text = torch.tensor(
        [[0.9, 0.3, 0.1, 0.0], [0.3, 0.9, 0.0, 0.2], [0.1, 0.0, 0.9, 0.3], [0.0, 0.2, 0.3, 0.9]],
        dtype=torch.float64,
        requires_grad=True,
    )
    image = torch.eye(4, dtype=torch.float64)
    scale = torch.tensor(5.0, dtype=torch.float64)
    groups = caption_group_ids(["a cat", "A cat ", "a dog", "a bird"])
    (grad_aware,) = torch.autograd.grad(clip_loss(image, text, scale, groups), text)
    (grad_plain,) = torch.autograd.grad(clip_loss(image, text, scale), text)
    # the duplicate pair (0, 1): plain targets push it apart, class-aware ones pull it together
    assert grad_plain[1, 0] > 0 and grad_plain[0, 1] > 0
    assert grad_aware[1, 0] < 0 and grad_aware[0, 1] < 0
    # a true negative pair is still pushed apart
    assert grad_aware[2, 0] > 0


def test_siglip_loss_hand_worked_2x2():
    scale, bias = torch.tensor(1.0, dtype=torch.float64), torch.tensor(-0.5, dtype=torch.float64)
    # logits [[.5, .1], [-.5, .3]]; positives on the diagonal, negatives enter with z = -1
    expected = (
        math.log(1 + math.exp(-0.5))
        + math.log(1 + math.exp(-0.3))
        + math.log(1 + math.exp(0.1))
        + math.log(1 + math.exp(-0.5))
    ) / 2
    assert siglip_loss(IMAGE_2, TEXT_2, scale, bias).item() == pytest.approx(expected, abs=1e-12)
    # one group: every pair is a positive
    expected_group = (
        math.log(1 + math.exp(-0.5))
        + math.log(1 + math.exp(-0.1))
        + math.log(1 + math.exp(0.5))
        + math.log(1 + math.exp(-0.3))
    ) / 2
    grouped = siglip_loss(IMAGE_2, TEXT_2, scale, bias, torch.tensor([1, 1]))
    assert grouped.item() == pytest.approx(expected_group, abs=1e-12)


@pytest.mark.parametrize("groups", [None, [0, 1, 0, 2, 1, 2]])
def test_siglip_loss_matches_loop_reference(groups):
    img, txt = _unit(6, 5, seed=9), _unit(6, 5, seed=10)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    group_ids = None if groups is None else torch.tensor(groups)
    loss = siglip_loss(img, txt, scale, bias, group_ids)
    assert loss.item() == pytest.approx(_loop_siglip(img, txt, 10.0, -3.0, groups), abs=1e-10)


def test_siglip_loss_is_stable_for_large_logits():
    img = torch.eye(2)
    loss = siglip_loss(img, -img, torch.tensor(1000.0), torch.tensor(0.0))
    # diagonal logits -1000 with z = +1: log(1 + e^1000) ~ 1000 each, off-diagonal 0: log 2
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx((2 * 1000.0 + 2 * math.log(2)) / 2, rel=1e-6)


@pytest.mark.parametrize("groups", [None, [0, 1, 0, 2, 1, 2]])
def test_row_blocks_recombine_to_whole_batch_loss(groups):
    img, txt = _unit(6, 5, seed=11), _unit(6, 5, seed=12)
    scale, bias = torch.tensor(4.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    group_ids = None if groups is None else torch.tensor(groups)
    clip_parts, siglip_parts = [], []
    for offset in (0, 2, 4):
        rows = slice(offset, offset + 2)
        i2t = clip_loss(img[rows], txt, scale, group_ids, row_offset=offset)
        t2i = clip_loss(txt[rows], img, scale, group_ids, row_offset=offset)
        clip_parts.append((i2t + t2i) / 2)
        siglip_parts.append(siglip_loss(img[rows], txt, scale, bias, group_ids, row_offset=offset))
    whole_clip = clip_loss(img, txt, scale, group_ids)
    whole_siglip = siglip_loss(img, txt, scale, bias, group_ids)
    torch.testing.assert_close(torch.stack(clip_parts).mean(), whole_clip, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.stack(siglip_parts).mean(), whole_siglip, atol=1e-12, rtol=0)


def test_local_block_is_image_to_text_only():
    img, txt = _unit(4, 3, seed=13), _unit(4, 3, seed=14)
    scale = torch.tensor(2.0, dtype=torch.float64)
    block = clip_loss(img[2:4], txt, scale, row_offset=2)
    logits = scale * img @ txt.T
    expected = sum(math.log(sum(math.exp(logits[i, j]) for j in range(4))) - logits[i, i] for i in (2, 3))
    assert block.item() == pytest.approx(float(expected) / 2, abs=1e-12)


def test_bad_row_offset_or_group_ids_raise():
    img, txt = _unit(4, 3, seed=15), _unit(4, 3, seed=16)
    scale, bias = torch.tensor(1.0), torch.tensor(0.0)
    with pytest.raises(ValueError, match="do not fit"):
        clip_loss(img[:2].float(), txt.float(), scale, row_offset=3)
    with pytest.raises(ValueError, match="do not fit"):
        siglip_loss(img.float(), txt.float(), scale, bias, row_offset=1)
    with pytest.raises(ValueError, match="group_ids"):
        clip_loss(img.float(), txt.float(), scale, torch.tensor([0, 1, 2]))


def test_caption_group_ids():
    ids = caption_group_ids(["A cat", "a dog", "a cat ", "  A DOG", "bird", "a Cat"])
    assert ids.dtype == torch.long
    assert ids.tolist() == [0, 1, 0, 1, 2, 0]
    assert caption_group_ids(["x", "y", "z"]).tolist() == [0, 1, 2]
    assert caption_group_ids([]).shape == (0,)
