"""Conversations for multimodal LLM fine-tuning: LLaVA and messages files, and VQA/caption records.

LLaVA format (JSON list or JSONL): `{"image": "a.jpg", "conversations": [{"from": "human", "value":
"<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}` (`images` for several images).
Messages format: `{"images": ["a.jpg"], "messages": [{"role": "user", "content": "<image>What is it?"},
{"role": "assistant", "content": "A cat."}]}`, where `content` may also be a list of
`{"type": "image"}` / `{"type": "text", "text": …}` parts. Each `<image>` marks where an image goes,
in the order of the images; a record with one image and no `<image>` gets it before its first turn.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mmtune.data.formats import Record, Table, read_jsonl_rows
from mmtune.errors import DataError

IMAGE = "<image>"
CAPTION_PROMPT = "Describe the image."
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class ConversationRecord(Record):
    """A multi-turn conversation about zero or more images (`images`; `image` is the first)."""

    messages: list[dict] = field(default_factory=list)  # {"role", "content" with <image> marks}
    images: list = field(default_factory=list)  # paths or pixel arrays, in <image> order


def _text(content, where: str) -> str:
    """A message's content (a string, or a list of image/text parts) → text with <image> marks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: 'content' must be a string or a list of parts")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            out.append(IMAGE)
        elif kind == "text":
            out.append(str(part.get("text", "")))
        else:
            raise DataError(f"{where}: a content part needs type 'image' or 'text'")
    return "".join(out)


def _turns(row: dict, where: str) -> list[dict]:
    """The row's turns as [{"role", "content"}], from `conversations` or `messages`."""
    if "conversations" in row:
        raw, role_key, text_key = row["conversations"], "from", "value"
    elif "messages" in row:
        raw, role_key, text_key = row["messages"], "role", "content"
    else:
        raise DataError(f"{where}: record has neither 'conversations' nor 'messages'")
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: the conversation must be a non-empty list of turns")
    turns = []
    for t in raw:
        if not isinstance(t, dict) or t.get(role_key) not in ROLES or text_key not in t:
            raise DataError(f"{where}: each turn needs '{role_key}' ({'/'.join(ROLES)}) and '{text_key}'")
        turns.append({"role": ROLES[t[role_key]], "content": _text(t[text_key], where)})
    if not any(t["role"] == "assistant" for t in turns):
        raise DataError(f"{where}: the conversation has no assistant (gpt) turn to learn")
    return turns


def parse_conversation(row: dict, where: str, root: Path) -> ConversationRecord:
    """One LLaVA or messages object → a ConversationRecord; DataError naming `where` otherwise."""
    turns = _turns(row, where)
    images = row.get("images", row.get("image", []))
    images = [images] if isinstance(images, str) else list(images or [])
    marks = sum(t["content"].count(IMAGE) for t in turns)
    if marks == 0 and len(images) == 1:
        first = next(t for t in turns if t["role"] != "system")
        first["content"] = f"{IMAGE}\n{first['content']}"
        marks = 1
    if marks != len(images):
        raise DataError(f"{where}: {marks} <image> placeholders for {len(images)} images")
    paths = [str(root / str(p)) for p in images]
    ident = str(row.get("id", where))
    return ConversationRecord(image=paths[0] if paths else "", id=ident, messages=turns, images=paths)


def sniff_conversations(path: str | Path) -> bool:
    """Whether a .json/.jsonl file holds LLaVA conversations or messages records (its head only:
    a conversations file can be large)."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in (".json", ".jsonl"):
        return False
    with open(p, encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16)
    if p.suffix.lower() == ".json" and not head.lstrip().startswith("["):
        return False
    first = head.lstrip("[ \n\r\t")[:4096]
    return '"conversations"' in first or '"messages"' in first


def read_conversations(path: str | Path, image_root: str | Path | None = None) -> Table:
    """A LLaVA / messages JSON list or JSONL file → ConversationRecords."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    if path.suffix.lower() == ".jsonl":
        rows = [(f"{path}:{n}", row) for n, row in read_jsonl_rows(path)]
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a conversations JSON file holds a list of records")
        rows = [(f"{path}: record {i}", row) for i, row in enumerate(data)]
    records = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: each record must be a JSON object")
        records.append(parse_conversation(row, where, root))
    if not records:
        raise DataError(f"{path}: no records")
    return Table(records)


def caption_conversation(rec: Record) -> ConversationRecord:
    """ "Describe the image." → the record's first caption (a question record's too)."""
    turns = [
        {"role": "user", "content": f"{IMAGE}\n{CAPTION_PROMPT}"},
        {"role": "assistant", "content": rec.captions[0] if rec.captions else ""},
    ]
    scene = getattr(rec, "image_id", "") if getattr(rec, "question", "") else ""
    ident = f"{scene}:caption" if scene else rec.id
    return ConversationRecord(image=rec.image, id=ident, messages=turns, images=[rec.image])


def merge_questions(recs: list[Record]) -> ConversationRecord:
    """Question records about one image → one multi-turn conversation (the image before the first
    question), each turn the question and its most common answer."""
    turns = []
    for rec in recs:
        turns += as_conversation(rec).messages
    first = recs[0]
    for t in turns[2:]:
        t["content"] = t["content"].replace(f"{IMAGE}\n", "", 1) if t["role"] == "user" else t["content"]
    ident = first.id if len(recs) == 1 else f"{first.id}+{len(recs) - 1}"
    return ConversationRecord(image=first.image, id=ident, messages=turns, images=[first.image])


def as_conversation(rec: Record) -> ConversationRecord:
    """Any record mmtune reads as a conversation: a question → its most common answer, a caption
    record → "Describe the image." → its first caption."""
    if isinstance(rec, ConversationRecord):
        return rec
    if getattr(rec, "question", ""):
        answer = Counter(rec.answers).most_common(1)[0][0] if rec.answers else ""
        user, reply = f"{IMAGE}\n{rec.question}", answer
    elif rec.captions:
        return caption_conversation(rec)
    else:
        raise DataError(f"record {rec.id}: neither a conversation, a question nor a caption")
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return ConversationRecord(image=rec.image, id=rec.id, messages=turns, images=[rec.image])
