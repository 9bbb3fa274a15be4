"""The official VQA accuracy (VQA v2 evaluation, vqaEval.py), quirks included, and soft scores.

Rules reproduced from the official evaluation script:
- answers have newlines/tabs replaced by spaces and are stripped;
- punctuation and digit/article/contraction normalisation run only when the ground-truth answers
  of a question are not all identical (`len(set(gtAnswers)) > 1`) — so with ten identical answers
  the prediction is compared raw (a capitalised prediction then scores 0);
- the period-stripping regex is applied with `count=re.UNICODE` (32) as a positional argument,
  so at most 32 periods go, and its look-behind is written as a look-ahead (`(?!<=\\d)`);
- accuracy of a question = mean over the 10 leave-one-annotator-out subsets of
  min(1, #matches among the other 9 / 3): 3 matching annotators give 0.9, not 1.0.
The official script rounds percentages to two decimals for display; we keep fractions unrounded.
A question with a single answer (built-in data, one-answer JSONL) has no leave-one-out subset
(the official formula gives 0); it is scored by exact match after the same normalisation.
"""

from __future__ import annotations

import re
from collections import defaultdict

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official processPunctuation: a mark next to a space (or any 1,000-style number in the
    answer) is deleted, otherwise replaced by a space; then periods not next to digits go."""
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # sic: count=32, as the official call passes it


def process_digit_article(text: str) -> str:
    """The official processDigitArticle: lower-case, number words → digits, drop articles,
    restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Full normalisation (what training targets and the answer vocabulary use)."""
    return process_digit_article(process_punctuation(_clean(text)))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official accuracy of one predicted answer against the annotators' answers."""
    gts = [_clean(a) for a in answers]
    pred = _clean(prediction)
    if len(set(gts)) > 1:  # sic: normalise only when the annotators disagree
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    if len(gts) == 1:
        return float(pred == gts[0])
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def soft_scores(answers: list[str]) -> dict[str, float]:
    """VQA v2 training targets: {normalised answer: min(#annotators / 3, 1)}; with fewer than
    three annotators an answer everyone gave scores 1."""
    counts: dict[str, int] = defaultdict(int)
    for a in answers:
        counts[normalize_answer(a)] += 1
    denom = min(3, len(answers))
    return {a: min(1.0, c / denom) for a, c in counts.items()}


def vqa_metrics(
    predictions: list[str],
    answers: list[list[str]],
    question_types: list[str] | None = None,
    answer_types: list[str] | None = None,
) -> dict[str, float]:
    """{acc, <qtype>.acc, <qtype prefix>.acc, answer_type.<t>.acc, n} over questions.

    Question types with a dot (`rel.closest`) also count towards their prefix (`rel`).
    """
    accs = [vqa_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)]
    out = {"acc": sum(accs) / max(1, len(accs)), "n": float(len(accs))}
    groups: dict[str, list[float]] = defaultdict(list)
    for i, acc in enumerate(accs):
        qt = question_types[i] if question_types else ""
        if qt:
            groups[qt].append(acc)
            if "." in qt:
                groups[qt.split(".")[0]].append(acc)
        at = answer_types[i] if answer_types else ""
        if at:
            groups[f"answer_type.{at}"].append(acc)
    for name, vals in sorted(groups.items()):
        out[f"{name}.acc"] = sum(vals) / len(vals)
    return out
