"""The pure-Python COCO tokenisation equals pycocoevalcap's PTBTokenizer (a real Java run), and
metrics on raw captions equal pycocoevalcap's scorers fed by that tokenizer."""

import shutil

import pytest

from mmtune.caption_metrics import caption_metrics
from mmtune.caption_tokenize import tokenize

pytest.importorskip("pycocoevalcap")
pytestmark = pytest.mark.skipif(
    shutil.which("java") is None,
    reason="pycocoevalcap's PTBTokenizer runs Stanford CoreNLP on Java",
)

CAPTIONS = [
    "A man's dog isn't running - it's a well-known 3.5 year-old dog.",  # possessive, hyphens
    "Two dogs' bowls and the kids' toys; James's car.",  # plural and -s's possessives
    "They're sure I'd we'll you've I'm he's can't won't don't cannot gonna wanna",  # contractions
    "IT'S A DOG THAT DOESN'T BARK.",  # contractions in capitals
    "a 2.5-inch cake cut at 10:30 on 12/25/2020 for $5.00, 1,000 guests and 50% off",  # numbers
    "Mr. Smith and Dr. Jones walk down St. Louis Ave. in the U.S. at 5 p.m. etc. vs. e.g. J. K. Rowling",
    'The "STOP" sign (a red one) stands [near] {a} 24-hour store... really?! yes!!',  # quotes
    "He said 'hello' to `them` -- then -- left; a: b, c.",  # single quotes, dashes
    "A café with naïve crème brûlée — “fancy” ‘quotes’ … ½ a pie, über Zoë’s straße",  # non-ASCII
    "a T-shirt, an x-ray, a co-op, o'clock, O'Neill's dog, rock 'n' roll and the '90s",
    "A dog. A cat! Is it? Yes... No.... the dogs'. Pre- and post-game",
    "  spaces\tand tabs   around  ",
    "",
]


def _reference(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def test_tokenize_equals_pycocoevalcap_ptb_tokenizer():
    ref = _reference({i: [c] for i, c in enumerate(CAPTIONS)})
    for i, caption in enumerate(CAPTIONS):
        assert " ".join(tokenize(caption)) == ref[i][0], caption


def test_tokenize_differs_from_a_plain_word_split():
    # the cases the former regex split wrongly: the reference keeps these tokens whole
    assert tokenize("a well-known 3.5 m pole isn't here") == [
        "a",
        "well-known",
        "3.5",
        "m",
        "pole",
        "is",
        "n't",
        "here",
    ]


def test_metrics_on_raw_captions_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs = [
        ["A man's dog isn't running.", "a man's dog is not running - it's well-known"],
        ["Two dogs' bowls; 3.5 cups.", "two bowls of the dogs, 3.5 cups!"],
        ["A T-shirt (red) on a co-op's shelf.", "a red T-shirt on a shelf"],
        ["Mr. Smith's café at 10:30.", "a café at 10:30 with Mr. Smith"],
    ]
    hyps = [
        "a man's dog isn't running",
        "the dogs' bowls, 3.5 cups",
        "a red T-shirt.",
        "Mr. Smith's café",
    ]
    gts = _reference({i: rs for i, rs in enumerate(refs)})
    res = _reference({i: [h] for i, h in enumerate(hyps)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    ours = caption_metrics(hyps, refs)
    for n in range(4):
        assert ours[f"bleu{n + 1}"] == pytest.approx(bleu[n], abs=1e-6)
    assert ours["rouge_l"] == pytest.approx(rouge, abs=1e-6)
    assert ours["cider"] == pytest.approx(cider, abs=1e-6)
