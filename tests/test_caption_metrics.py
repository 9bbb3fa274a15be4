"""Our BLEU / ROUGE-L / CIDEr-D equal pycocoevalcap's on the same tokenised inputs."""

import random
import shutil

import pytest

from mmtune.caption_metrics import bleu, caption_metrics, cider_d, meteor, rouge_l, tokenize

pytest.importorskip("pycocoevalcap")

WORDS = [
    "a",
    "the",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "at",
    "top",
    "bottom",
    "left",
    "right",
    "and",
    "of",
]


def _corpus(seed: int, n: int = 40):
    rng = random.Random(seed)
    hyps, refs = [], []
    for _ in range(n):
        base = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        rs = []
        for _ in range(rng.randint(1, 5)):
            r = [w if rng.random() < 0.7 else rng.choice(WORDS) for w in base]
            rs.append(" ".join(r[: rng.randint(2, len(r))]))
        hyp = [w if rng.random() < 0.6 else rng.choice(WORDS) for w in base]
        hyps.append(" ".join(hyp[: rng.randint(1, len(hyp))]))
        refs.append(rs)
    return hyps, refs


def _coco(hyps, refs):
    return {i: rs for i, rs in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_to_pycocoevalcap(seed):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    hyps, refs = _corpus(seed)
    gts, res = _coco(hyps, refs)
    theirs_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert bleu(hyps, refs) == pytest.approx(theirs_bleu, rel=1e-9, abs=1e-12)
    theirs_rouge, _ = Rouge().compute_score(gts, res)
    assert rouge_l(hyps, refs) == pytest.approx(theirs_rouge, rel=1e-9)
    theirs_cider, _ = Cider().compute_score(gts, res)
    assert cider_d(hyps, refs) == pytest.approx(theirs_cider, rel=1e-9)


def test_perfect_captions_score_one():
    refs = [["a red circle at the top left"], ["a blue square at the bottom right"]]
    m = caption_metrics([r[0] for r in refs], refs)
    assert m["bleu4"] == pytest.approx(1.0) and m["rouge_l"] == pytest.approx(1.0)


def test_tokenize_drops_punctuation_and_case():
    assert tokenize("A red circle, and THE blue one.") == [
        "a",
        "red",
        "circle",
        "and",
        "the",
        "blue",
        "one",
    ]


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_through_pycocoevalcap():
    hyps, refs = _corpus(0, n=5)
    perfect = meteor([r[0] for r in refs], refs)
    assert 0.0 <= meteor(hyps, refs) < perfect <= 1.0
