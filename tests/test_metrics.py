"""Metrics checked against scikit-learn, numpy loop references and hand-worked cases."""

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from mmtune.metrics import (
    classification_metrics,
    confusion_matrix,
    retrieval_metrics,
    zeroshot_weights,
)


def _loop_retrieval(image_emb, text_emb, owners, ks):
    """Brute-force Recall@K with a full similarity matrix and explicit sorted lists."""
    sims = image_emb @ text_emb.T
    out = {}
    for k in ks:
        i2t = [any(owners[t] == i for t in np.argsort(-sims[i])[:k]) for i in range(len(sims))]
        t2i = [owners[t] in np.argsort(-sims[:, t])[:k] for t in range(sims.shape[1])]
        out[f"i2t.R@{k}"] = sum(i2t) / len(i2t)
        out[f"t2i.R@{k}"] = sum(t2i) / len(t2i)
    return out


# image i = e_i so similarity (image i, text t) = TEXTS[t, i]; text t belongs to image OWNERS[t]
IMAGES = torch.eye(3)
TEXTS = torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.8, 0.0, 0.6], [0.0, 0.0, 1.0]])
OWNERS = [0, 0, 1, 2, 2]


def test_zeroshot_weights_hand_worked_class_major():
    text = torch.tensor([[3.0, 4.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    weights = zeroshot_weights(text, n_classes=2, n_templates=2)
    # class 0: mean of (.6, .8, 0) and (0, 1, 0) = (.3, .9, 0); class 1: (.5, 0, .5)
    expected = torch.tensor(
        [[1 / math.sqrt(10), 3 / math.sqrt(10), 0.0], [1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(weights, expected)


def test_zeroshot_weights_matches_numpy_loop():
    rng = np.random.default_rng(0)
    n_classes, n_templates = 4, 3
    text = rng.normal(size=(n_classes * n_templates, 5)) * rng.uniform(0.5, 3, size=(12, 1))
    weights = zeroshot_weights(torch.from_numpy(text), n_classes, n_templates).numpy()
    for c in range(n_classes):
        rows = [text[c * n_templates + t] for t in range(n_templates)]
        mean = sum(r / np.linalg.norm(r) for r in rows) / n_templates
        np.testing.assert_allclose(weights[c], mean / np.linalg.norm(mean), atol=1e-12)


def test_zeroshot_weights_rejects_wrong_row_count():
    with pytest.raises(ValueError, match="3 classes x 2 templates"):
        zeroshot_weights(torch.ones(5, 4), n_classes=3, n_templates=2)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_classification_metrics_match_sklearn(as_tensor):
    rng = np.random.default_rng(1)
    n_classes = 9
    logits = rng.normal(size=(300, n_classes)).astype(np.float32)
    # classes 1 and 6 never appear as labels: recall is averaged over present classes only
    labels = rng.choice([0, 2, 3, 4, 5, 7, 8], size=300)
    logits[np.arange(0, 300, 3), labels[::3]] += 2.0
    given = (torch.from_numpy(logits), torch.from_numpy(labels)) if as_tensor else (logits, labels)
    got = classification_metrics(*given, ks=(1, 3, 5))
    assert set(got) == {"top1", "top3", "top5", "mean_per_class_recall"}
    for k in (1, 3, 5):
        want = top_k_accuracy_score(labels, logits, k=k, labels=np.arange(n_classes))
        assert got[f"top{k}"] == pytest.approx(want, abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that y_pred has classes absent from y_true
        want_recall = balanced_accuracy_score(labels, logits.argmax(axis=1))
    assert got["mean_per_class_recall"] == pytest.approx(want_recall, abs=1e-12)
    assert all(type(v) is float for v in got.values())


def test_classification_metrics_hand_worked_with_k_clipped():
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.3, 0.6], [0.8, 0.15, 0.05]])
    labels = np.array([0, 1, 2, 2, 1])
    got = classification_metrics(logits, labels, ks=(1, 2, 5))
    # top-1 preds 0, 1, 0, 2, 0 -> 3/5; label ranks 0, 0, 1, 0, 1 -> top2 = 5/5
    assert got["top1"] == pytest.approx(3 / 5)
    assert got["top2"] == 1.0
    assert got["top5"] == 1.0  # k = 5 clipped to 3 classes
    # recall: class 0 1/1, class 1 1/2, class 2 1/2
    assert got["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_classification_metrics_ties_rank_lower_class_first():
    logits = torch.zeros(3, 4)
    got = classification_metrics(logits, torch.tensor([0, 1, 3]), ks=(1, 2))
    # all scores tied: class 0 ranks first, class 1 second, class 3 last
    assert got["top1"] == pytest.approx(1 / 3)
    assert got["top2"] == pytest.approx(2 / 3)


def test_classification_metrics_rejects_bad_labels():
    with pytest.raises(ValueError, match="lie in"):
        classification_metrics(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(np.zeros((2, 3)), np.array([0, 1, 2]))


def test_confusion_matrix_matches_sklearn_and_hand():
    preds, labels = np.array([0, 1, 1, 2, 0, 2]), np.array([0, 1, 2, 2, 1, 0])
    expected = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1]])
    np.testing.assert_array_equal(confusion_matrix(preds, labels, 3), expected)
    rng = np.random.default_rng(2)
    preds, labels = rng.integers(0, 6, size=200), rng.integers(0, 6, size=200)
    got = confusion_matrix(torch.from_numpy(preds), torch.from_numpy(labels), 7)
    np.testing.assert_array_equal(got, sk_confusion_matrix(labels, preds, labels=np.arange(7)))
    assert got.shape == (7, 7)


def test_retrieval_metrics_hand_worked():
    got = retrieval_metrics(IMAGES, TEXTS, OWNERS)
    # image 0: texts ranked t1 (own, 1.0) first although its first text t0 is only third -> hit@1
    # image 1: t0 (.8) beats its own t2 (.6) -> miss@1; image 2: t4 (own, 1.0) first -> hit@1
    # texts: t1 -> image 0 and t4 -> image 2 are top-1; t0, t2, t3 rank their image second
    expected = {
        "i2t.R@1": 2 / 3,
        "i2t.R@5": 1.0,
        "i2t.R@10": 1.0,
        "t2i.R@1": 2 / 5,
        "t2i.R@5": 1.0,
        "t2i.R@10": 1.0,
    }
    assert got == pytest.approx(expected)
    assert all(type(v) is float for v in got.values())
    got2 = retrieval_metrics(IMAGES, TEXTS, torch.tensor(OWNERS), ks=(2,), block_size=1)
    assert got2 == pytest.approx({"i2t.R@2": 1.0, "t2i.R@2": 1.0})


def test_retrieval_metrics_skip_images_without_texts():
    texts = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # image 0 has no text, so i2t averages over images 1 and 2 (both hits) only, not 2 / 3
    got = retrieval_metrics(IMAGES, texts, [1, 2], ks=(1,))
    assert got == pytest.approx({"i2t.R@1": 1.0, "t2i.R@1": 1.0})


def test_retrieval_metrics_count_ties_against_the_query():
    got = retrieval_metrics(torch.ones(3, 2) / math.sqrt(2), torch.ones(3, 2) / math.sqrt(2), [0, 1, 2])
    assert got == pytest.approx(
        {
            "i2t.R@1": 0.0,
            "i2t.R@5": 1.0,
            "i2t.R@10": 1.0,
            "t2i.R@1": 0.0,
            "t2i.R@5": 1.0,
            "t2i.R@10": 1.0,
        }
    )


@pytest.mark.parametrize("block_size", [1, 4, 1024])
def test_retrieval_metrics_match_loop_reference(block_size):
    rng = np.random.default_rng(3)
    n_images, dim = 20, 6
    owners = np.concatenate([np.arange(n_images), rng.integers(0, n_images, size=25)])
    rng.shuffle(owners)
    images = rng.normal(size=(n_images, dim))
    # texts near their image so recall is neither 0 nor 1
    texts = images[owners] + 1.2 * rng.normal(size=(len(owners), dim))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    ks = (1, 3, 10)
    got = retrieval_metrics(
        torch.from_numpy(images).float(),
        torch.from_numpy(texts).float(),
        owners,
        ks,
        block_size=block_size,
    )
    want = _loop_retrieval(images, texts, owners, ks)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["i2t.R@1"] < 1 and 0 < got["t2i.R@1"] < 1


def test_retrieval_metrics_reject_bad_index():
    with pytest.raises(ValueError, match="lie in"):
        retrieval_metrics(IMAGES, TEXTS, [0, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(IMAGES, TEXTS, [0, 0, 1, 2])
