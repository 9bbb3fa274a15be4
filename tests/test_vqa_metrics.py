"""The official VQA accuracy on hand-worked cases that follow vqaEval.py's rules."""

import pytest

from mmtune.vqa_metrics import (
    normalize_answer,
    process_punctuation,
    soft_scores,
    vqa_accuracy,
    vqa_metrics,
)


def _answers(match: str, k: int, other: str = "cat") -> list[str]:
    return [match] * k + [other] * (10 - k)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (0, 0.0),
        # leave-one-out: the 1 matching annotator out → 0 matches; the 9 others in → 1/3 each
        (1, 9 * (1 / 3) / 10),
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        (3, (3 * (2 / 3) + 7 * 1.0) / 10),  # 0.9, not 1.0
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_leave_one_annotator_out_average(k, expected):
    assert vqa_accuracy("dog", _answers("dog", k)) == pytest.approx(expected)


def test_three_of_ten_is_point_nine():
    assert vqa_accuracy("dog", _answers("dog", 3)) == pytest.approx(0.9)


def test_normalisation_applies_when_annotators_disagree():
    # number words → digits, case folded, articles dropped, trailing period stripped
    assert vqa_accuracy("Two", _answers("2", 3, "yes")) == pytest.approx(0.9)
    assert vqa_accuracy("the dog.", _answers("dog", 4)) == 1.0
    assert vqa_accuracy("dont", _answers("don't", 4)) == 1.0  # contraction restored


def test_no_normalisation_when_all_ten_agree():
    """Quirk: with ten identical answers the prediction is compared raw."""
    assert vqa_accuracy("two", ["two"] * 10) == 1.0
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("Dog", ["dog"] * 10) == 0.0
    assert vqa_accuracy("  dog\n", ["dog"] * 10) == 1.0  # whitespace is always cleaned


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1,000", "1000"),  # a digit comma anywhere: marks are deleted, not spaced
        ("red,blue", "red blue"),  # otherwise a mark becomes a space
        ("yes, sir", "yes sir"),  # a mark next to a space is deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("ok.", "ok"),
    ],
)
def test_punctuation_rules(raw, expected):
    assert " ".join(process_punctuation(raw).split()) == expected


def test_full_normalisation():
    assert normalize_answer("A Red-Ball!") == "red ball"
    assert normalize_answer("None") == "0"
    assert normalize_answer("an ten") == "10"


def test_single_answer_is_exact_match_after_normalisation():
    assert vqa_accuracy("circle", ["circle"]) == 1.0
    assert vqa_accuracy("square", ["circle"]) == 0.0


def test_soft_scores():
    s = soft_scores(["dog"] * 2 + ["Dog."] + ["cat"] * 1 + ["puppy"] * 6)
    assert s == {"dog": 1.0, "cat": pytest.approx(1 / 3), "puppy": 1.0}
    assert soft_scores(["circle"]) == {"circle": 1.0}


def test_per_type_breakdown():
    m = vqa_metrics(
        ["circle", "left", "3", "square"],
        [["circle"], ["right"], ["3"], ["square"]],
        ["nonrel.shape", "nonrel.horizontal", "rel.count", "rel.closest"],
        ["other", "other", "number", "other"],
    )
    assert m["acc"] == 0.75
    assert m["nonrel.acc"] == 0.5 and m["rel.acc"] == 1.0
    assert m["nonrel.horizontal.acc"] == 0.0 and m["rel.count.acc"] == 1.0
    assert m["answer_type.number.acc"] == 1.0 and m["answer_type.other.acc"] == pytest.approx(2 / 3)
