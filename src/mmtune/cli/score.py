"""`mmtune score vqa|caption`: score a results file in the official format against the official
annotations, without a model: VQA v2 accuracy (overall, per question type and per answer type,
`mmtune.vqa_metrics`) and COCO caption BLEU-1…4 / ROUGE-L / CIDEr-D (`mmtune.caption_metrics`,
equal to pycocoevalcap's on raw captions).

VQA: `--annotations` (v2 `annotations` JSON), `--questions` (v2 `questions` JSON), `--results`
(`[{"question_id", "answer"}]`, one per annotated question, as the official evaluation requires).
Captions: `--references` (COCO captions JSON with `annotations: [{"image_id", "caption"}]`),
`--results` (`[{"image_id", "caption"}]`, one per image; the images scored are those in results).
"""

from __future__ import annotations

import json
from pathlib import Path

from mmtune.errors import DataError, UserError


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="score an official-format results file (vqa, caption)")
    kinds = p.add_subparsers(dest="kind", required=True)
    v = kinds.add_parser("vqa", help="VQA v2 accuracy of a results file")
    v.add_argument("--annotations", required=True, help="VQA v2 annotations JSON")
    v.add_argument("--questions", required=True, help="VQA v2 questions JSON")
    v.add_argument("--results", required=True, help='[{"question_id", "answer"}] JSON')
    v.add_argument("-o", "--output", help="also write the metrics to this JSON file")
    v.set_defaults(func=cmd_score_vqa)
    c = kinds.add_parser("caption", help="COCO caption metrics of a results file")
    c.add_argument("--references", required=True, help="COCO captions annotations JSON")
    c.add_argument("--results", required=True, help='[{"image_id", "caption"}] JSON')
    c.add_argument("--meteor", action="store_true", help="also METEOR (needs Java)")
    c.add_argument("-o", "--output", help="also write the metrics to this JSON file")
    c.set_defaults(func=cmd_score_caption)


def _load(path: str, flag: str):
    """The parsed JSON of a file, or a one-line error naming it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file ({flag})")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _rows(path: str, flag: str, key: str | None, fields: tuple[str, ...]) -> list[dict]:
    """The list of records of a JSON file (under `key` when given), each holding `fields`."""
    data = _load(path, flag)
    if key is not None:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f'{path}: expected a JSON object with a "{key}" list ({flag})')
        data = data[key]
    elif not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{{', '.join(fields)}}} ({flag})")
    for i, row in enumerate(data):
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        if missing:
            raise DataError(f"{path}: entry {i} has no {missing[0]!r} ({flag})")
    return data


def _unique(rows: list[dict], key: str, path: str) -> dict:
    """{row[key]: row}, refusing a key given twice."""
    out: dict = {}
    for row in rows:
        if row[key] in out:
            raise DataError(f"{path}: {key} {row[key]} appears twice")
        out[row[key]] = row
    return out


def score_vqa(annotations: str, questions: str, results: str) -> dict[str, float]:
    """VQA v2 metrics of a results file: {acc, n, <question type>.acc, answer_type.<t>.acc}."""
    from mmtune.vqa_metrics import vqa_metrics

    anns = _unique(
        _rows(annotations, "--annotations", "annotations", ("question_id", "answers")), "question_id", annotations
    )
    qids = {q["question_id"] for q in _rows(questions, "--questions", "questions", ("question_id",))}
    if set(anns) - qids:
        first = min(set(anns) - qids, key=str)
        raise DataError(f"{questions}: question_id {first} of --annotations is not among its questions")
    res = _unique(_rows(results, "--results", None, ("question_id", "answer")), "question_id", results)
    if extra := set(res) - set(anns):
        raise DataError(f"{results}: question_id {min(extra, key=str)} is not in {annotations}")
    if missing := set(anns) - set(res):
        raise DataError(
            f"{results}: {len(missing)} of {len(anns)} annotated questions have no "
            f"answer (e.g. question_id {min(missing, key=str)})"
        )
    ids = sorted(anns, key=str)
    return vqa_metrics(
        [str(res[i]["answer"]) for i in ids],
        [[str(a.get("answer", "")) for a in anns[i]["answers"]] for i in ids],
        [anns[i].get("question_type", "") for i in ids],
        [anns[i].get("answer_type", "") for i in ids],
    )


def score_captions(references: str, results: str, meteor: bool = False) -> dict[str, float]:
    """COCO caption metrics of a results file over the images it captions."""
    from mmtune.caption_metrics import caption_metrics

    refs: dict = {}
    for a in _rows(references, "--references", "annotations", ("image_id", "caption")):
        refs.setdefault(a["image_id"], []).append(str(a["caption"]))
    res = _unique(_rows(results, "--results", None, ("image_id", "caption")), "image_id", results)
    if not res:
        raise DataError(f"{results}: no captions to score")
    if extra := set(res) - set(refs):
        raise DataError(f"{results}: image_id {min(extra, key=str)} has no reference caption in {references}")
    ids = sorted(res, key=str)
    m = caption_metrics([str(res[i]["caption"]) for i in ids], [refs[i] for i in ids], with_meteor=meteor)
    return {**m, "n": float(len(ids))}


def _report(metrics: dict[str, float], output: str | None) -> int:
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.4f}" if k != "n" else f"{k:<{width}}  {int(v)}")
    if output:
        try:
            Path(output).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise UserError(f"{output}: cannot write ({e.strerror})") from None
    return 0


def _no_extra(extra: list[str]) -> None:
    if extra:
        raise UserError(f"score: unknown arguments {' '.join(extra)}")


def cmd_score_vqa(args, extra) -> int:
    _no_extra(extra)
    return _report(score_vqa(args.annotations, args.questions, args.results), args.output)


def cmd_score_caption(args, extra) -> int:
    _no_extra(extra)
    return _report(score_captions(args.references, args.results, args.meteor), args.output)
