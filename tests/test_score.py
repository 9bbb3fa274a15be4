"""`mmtune score vqa|caption` on small hand-made official-format files."""

import json
import shutil

import pytest

from mmtune.cli import main


def _write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def _vqa_files(tmp_path, results):
    ten = lambda *xs: [{"answer": a, "answer_id": i + 1} for i, a in enumerate(xs)]  # noqa: E731
    anns = {
        "annotations": [
            {
                "question_id": 1,
                "image_id": 9,
                "question_type": "what color is the",
                "answer_type": "other",
                "answers": ten(*["red"] * 10),
            },
            {
                "question_id": 2,
                "image_id": 9,
                "question_type": "how many",
                "answer_type": "number",
                "answers": ten(*["2"] * 2, *["two"] * 2, *["3"] * 6),
            },
            {
                "question_id": 3,
                "image_id": 9,
                "question_type": "is the",
                "answer_type": "yes/no",
                "answers": ten(*["yes"] * 9, "no"),
            },
        ]
    }
    qs = {"questions": [{"question_id": i, "image_id": 9, "question": "?"} for i in (1, 2, 3)]}
    return (
        _write(tmp_path / "anns.json", anns),
        _write(tmp_path / "qs.json", qs),
        _write(tmp_path / "res.json", results),
    )


def test_score_vqa_hand_worked(tmp_path, capsys):
    res = [{"question_id": 1, "answer": "Red"}, {"question_id": 2, "answer": "two"}, {"question_id": 3, "answer": "no"}]
    a, q, r = _vqa_files(tmp_path, res)
    out = tmp_path / "m.json"
    assert main(["score", "vqa", "--annotations", a, "--questions", q, "--results", r, "-o", str(out)]) == 0
    m = json.loads(out.read_text())
    # q1: ten identical answers, so no normalisation: "Red" != "red" → 0 (the official quirk).
    # q2: "two" → "2" after normalisation; 4 of 10 give "2": each leave-one-out subset has 3 or 4
    #     matches among 9 → 1.0. q3: 1 annotator said "no": 9 subsets hold it (1/3), one does not.
    q3 = 9 * (1 / 3) / 10
    assert m["acc"] == pytest.approx((0 + 1 + q3) / 3)
    assert m["what color is the.acc"] == 0 and m["how many.acc"] == pytest.approx(1.0)
    assert m["answer_type.yes/no.acc"] == pytest.approx(q3) and m["n"] == 3
    assert "answer_type.number.acc" in capsys.readouterr().out


def test_score_vqa_bad_files_name_the_file(tmp_path, capsys):
    a, q, r = _vqa_files(tmp_path, [{"question_id": 1, "answer": "red"}])
    assert main(["score", "vqa", "--annotations", a, "--questions", q, "--results", r]) == 2
    err = capsys.readouterr().err
    assert r in err and "2 of 3 annotated questions have no answer" in err and len(err.splitlines()) == 1
    (tmp_path / "res.json").write_text("[{")
    assert main(["score", "vqa", "--annotations", a, "--questions", q, "--results", r]) == 2
    assert f"{r}: not valid JSON" in capsys.readouterr().err
    _write(tmp_path / "res.json", [{"question_id": 1}])
    assert main(["score", "vqa", "--annotations", a, "--questions", q, "--results", r]) == 2
    assert "entry 0 has no 'answer'" in capsys.readouterr().err
    assert main(["score", "vqa", "--annotations", str(tmp_path / "no.json"), "--questions", q, "--results", r]) == 2
    assert "no.json: no such file (--annotations)" in capsys.readouterr().err


REFS = {
    1: ["A man's dog isn't running.", "a man's dog is not running - it's well-known"],
    2: ["Two dogs' bowls; 3.5 cups.", "two bowls of the dogs, 3.5 cups!"],
    3: ["A T-shirt (red) on a co-op's shelf.", "a red T-shirt on a shelf"],
}
HYPS = {1: "a man's dog isn't running", 2: "the dogs' bowls, 3.5 cups", 3: "a red T-shirt."}


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer needs Java")
def test_score_caption_equals_pycocoevalcap(tmp_path):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    anns = [{"image_id": i, "id": 10 * i + k, "caption": c} for i, cs in REFS.items() for k, c in enumerate(cs)]
    refs = _write(tmp_path / "refs.json", {"images": [{"id": i} for i in REFS], "annotations": anns})
    res = _write(tmp_path / "res.json", [{"image_id": i, "caption": c} for i, c in HYPS.items()])
    out = tmp_path / "m.json"
    assert main(["score", "caption", "--references", refs, "--results", res, "-o", str(out)]) == 0
    m = json.loads(out.read_text())
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in cs] for i, cs in REFS.items()})
    hyp = tok.tokenize({i: [{"caption": c}] for i, c in HYPS.items()})
    bleu, _ = Bleu(4).compute_score(gts, hyp, verbose=0)
    assert [m[f"bleu{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-6)
    assert m["rouge_l"] == pytest.approx(Rouge().compute_score(gts, hyp)[0], abs=1e-6)
    assert m["cider"] == pytest.approx(Cider().compute_score(gts, hyp)[0], abs=1e-6)


def test_score_caption_bad_files_name_the_file(tmp_path, capsys):
    refs = _write(tmp_path / "refs.json", {"annotations": [{"image_id": 1, "caption": "a dog"}]})
    res = _write(tmp_path / "res.json", [{"image_id": 2, "caption": "a dog"}])
    assert main(["score", "caption", "--references", refs, "--results", res]) == 2
    assert f"{res}: image_id 2 has no reference caption" in capsys.readouterr().err
    bad = _write(tmp_path / "bad.json", [{"image_id": 1, "caption": "x"}])
    assert main(["score", "caption", "--references", bad, "--results", res]) == 2
    assert f'{bad}: expected a JSON object with a "annotations" list (--references)' in capsys.readouterr().err
