"""Question-answering data: the QARecord, VQA v2 (questions + annotations JSON) and VQA JSONL.

VQA JSONL: one object per line with `image`, `question`, `answers` (a list, or one string), and
optionally `history` (prior dialog turns, oldest first: strings or {"question", "answer"}),
`question_type`, `answer_type`, `id`. VQA v2: the official questions file (`question_id`,
`image_id`, `question`) with its annotations file (10 `answers` per question) beside it; images
are found under `data.image_root` by the image id in their file name (COCO_train2014_…42.jpg).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mmtune.data.formats import Record, Table, read_jsonl_rows
from mmtune.data.images import IMAGE_EXTENSIONS
from mmtune.errors import ConfigError, DataError


@dataclass
class QARecord(Record):
    """A question about one image, with its annotators' answers (VQA v2: ten)."""

    image_id: str = ""  # questions of one image share it (their image is decoded once)
    question: str = ""
    answers: list[str] = field(default_factory=list)
    question_type: str = ""
    answer_type: str = ""
    history: list[str] = field(default_factory=list)  # prior turns, oldest first


def format_history(turns) -> list[str]:
    """Dialog turns (strings or {"question", "answer"}) → ["question answer", …]."""
    out = []
    for t in turns or []:
        if isinstance(t, dict):
            out.append(f"{t.get('question', '')} {t.get('answer', '')}".strip())
        else:
            out.append(str(t))
    return out


def sniff_vqa(path: str | Path) -> str | None:
    """'vqa2' / 'vqa-jsonl' when the file holds questions, else None (another reader's file)."""
    p = Path(path)
    if not p.is_file():
        return None
    suffix = p.suffix.lower()
    if suffix == ".json":
        with open(p, encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 16)
        return "vqa2" if '"question_id"' in head else None
    if suffix == ".jsonl":
        with open(p, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        return None  # the table reader names the bad line
                    return "vqa-jsonl" if isinstance(row, dict) and "question" in row else None
    return None


def read_vqa(path: str | Path, image_root: str | Path | None = None) -> Table:
    """Read a VQA v2 questions JSON or a VQA JSONL file into QARecords."""
    kind = sniff_vqa(path)
    if kind == "vqa2":
        return read_vqa2(path, image_root)
    if kind == "vqa-jsonl":
        return read_vqa_jsonl(path, image_root)
    raise DataError(f"{path}: not a VQA file (VQA v2 questions JSON or JSONL with 'question')")


def read_vqa_jsonl(path: str | Path, image_root: str | Path | None = None) -> Table:
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    records = []
    for n, row in read_jsonl_rows(path):
        for key in ("image", "question", "answers"):
            if key not in row:
                raise DataError(f"{path}:{n}: record has no '{key}' (needs image, question, answers)")
        answers = [row["answers"]] if isinstance(row["answers"], str) else list(row["answers"])
        if not answers:
            raise DataError(f"{path}:{n}: record has an empty 'answers' list")
        image = str(root / str(row["image"]))
        records.append(
            QARecord(
                image=image,
                id=str(row.get("id", f"{path.name}:{n}")),
                image_id=image,
                question=str(row["question"]),
                answers=[str(a) for a in answers],
                question_type=str(row.get("question_type", "")),
                answer_type=str(row.get("answer_type", "")),
                history=format_history(row.get("history")),
            )
        )
    if not records:
        raise DataError(f"{path}: no records")
    return Table(records)


def _load_json(path: Path, key: str) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: VQA v2 JSON needs a '{key}' list")
    return data[key]


def annotations_path(questions: Path) -> Path:
    """The annotations file beside a questions file (official and simple naming)."""
    name = questions.name
    candidates = [
        re.sub(r"(OpenEnded|MultipleChoice)_", "", name).replace("questions", "annotations"),
        name.replace("questions", "annotations"),
    ]
    for c in candidates:
        if c != name and (questions.parent / c).is_file():
            return questions.parent / c
    raise DataError(f"{questions}: annotations file not found (looked for {questions.parent / candidates[0]})")


def image_index(root: Path) -> dict[int, str]:
    """{image id: path} for images under root whose file name ends in digits (COCO naming)."""
    out = {}
    for p in root.rglob("*"):
        m = re.search(r"(\d+)$", p.stem)
        if m and p.suffix.lower() in IMAGE_EXTENSIONS:
            out[int(m.group(1))] = str(p)
    return out


def read_vqa2(path: str | Path, image_root: str | Path | None = None) -> Table:
    """VQA v2 questions + annotations → QARecords; every question needs its 10 answers."""
    path = Path(path)
    questions = _load_json(path, "questions")
    ann_path = annotations_path(path)
    anns = {a.get("question_id"): a for a in _load_json(ann_path, "annotations")}
    root = Path(image_root) if image_root else path.parent
    images = image_index(root)
    records = []
    for q in questions:
        qid = q.get("question_id")
        where = f"{path}: question {qid}"
        if "question" not in q or "image_id" not in q:
            raise DataError(f"{where}: needs 'question' and 'image_id'")
        ann = anns.get(qid)
        if ann is None or not ann.get("answers"):
            raise DataError(f"{where}: no answers in {ann_path.name}")
        image = images.get(int(q["image_id"])) if str(q["image_id"]).isdigit() else None
        if image is None:
            raise DataError(f"{where}: unknown image id {q['image_id']} (no image under {root})")
        try:
            answers = [str(a["answer"]) for a in ann["answers"]]
        except (KeyError, TypeError):
            raise DataError(f"{where}: each answer needs an 'answer' field") from None
        records.append(
            QARecord(
                image=image,
                id=str(qid),
                image_id=str(q["image_id"]),
                question=str(q["question"]),
                answers=answers,
                question_type=str(ann.get("question_type", "")),
                answer_type=str(ann.get("answer_type", "")),
            )
        )
    return Table(records)


def check_curriculum(records, types: list[str]) -> None:
    """A curriculum (`options.curriculum_types`) must match some training question: a one-line
    error naming the question types there are, otherwise."""
    if not any(getattr(r, "question_type", "").startswith(tuple(types)) for r in records):
        seen = sorted({getattr(r, "question_type", "") for r in records} - {""})[:8]
        raise ConfigError(
            f"options.curriculum_types {types} match no training question "
            f"(question types: {seen}); set options.curriculum_epochs=0 for no curriculum"
        )
