"""Does a vlm-sft run on the built-in `shapes` compare distances, or guess from the scene?

Asks the run (greedy, one question a conversation, as its evaluation does) the first `--n`
relational questions of each kind on a split and prints, as JSON:

- closest / furthest: accuracy overall and by how far apart the two candidate objects are (the
  gap, in pixels, between the nearest and the second-nearest distance — or the furthest and the
  second-furthest); how often the reply is the shape most of the other five objects have (the
  scene-level guess that needs no distance) and how often that guess is right; and the accuracy on the questions where the
  runner-up object has the other shape (there only a comparison of distances is right).
- count: accuracy and the confusion of true vs replied counts.

A model that compares distances gains accuracy as the gap grows and is right, where the runner-up
differs, as often as elsewhere; one that follows the majority of the scene is flat in the gap and
near chance (0.5) where the runner-up differs. README ("Multimodal LLM fine-tuning") has the
figures of `make vlm-shapes`:

    python bench/vlm_shapes_relations.py runs/vlm-shapes [--split val] [--n 300]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import torch

GAPS = ((0, 3), (3, 6), (6, 10), (10, 20), (20, 1000))


def distance_row(kind: int, colour: int, centres: np.ndarray, shapes: np.ndarray) -> dict:
    """What a closest (kind 3) / furthest (4) question's answer depends on."""
    from mmtune.data.builtin.shapes import SHAPES

    d = np.sqrt(((centres - centres[colour]) ** 2).sum(1)).astype(float)
    d[colour] = np.inf if kind == 3 else -np.inf
    order = np.argsort(d if kind == 3 else -d)
    others = np.delete(shapes, colour)
    majority = None if others.mean() == 0.5 else SHAPES[int(others.mean() > 0.5)]
    return {
        "gap": float(abs(d[order[1]] - d[order[0]])),
        "majority": majority,
        "runner_up_differs": bool(shapes[order[1]] != shapes[order[0]]),
    }


def summary(rows: list[dict]) -> dict:
    ok = np.array([r["ok"] for r in rows], bool)
    gap = np.array([r["gap"] for r in rows])
    out = {"n": len(rows), "acc": round(float(ok.mean()), 3), "by_gap_px": {}}
    for lo, hi in GAPS:
        m = (gap >= lo) & (gap < hi)
        if m.any():
            out["by_gap_px"][f"{lo}-{hi if hi < 1000 else ''}"] = {
                "n": int(m.sum()),
                "acc": round(float(ok[m].mean()), 3),
            }
    out["reply_is_scene_majority"] = round(float(np.mean([r["reply"] == r["majority"] for r in rows])), 3)
    # the guess itself (a tie of 2-3 … 3-2 has no majority: counted wrong)
    out["scene_majority_acc"] = round(float(np.mean([r["answer"] == r["majority"] for r in rows])), 3)
    differs = [r["ok"] for r in rows if r["runner_up_differs"]]
    out["acc_where_runner_up_differs"] = round(float(np.mean(differs)), 3) if differs else None
    return out


@torch.no_grad()
def main(argv=None) -> dict:
    from mmtune.data.builtin import shapes as S
    from mmtune.data.conversations import as_conversation
    from mmtune.runs import open_run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--n", type=int, default=300, help="questions of each relational kind")
    args = ap.parse_args(argv)
    arrays = S.load_arrays("shapes")[args.split]
    per_kind: dict[str, list] = {}
    for rec in S.scene_records(arrays, args.split):
        if rec.question_type.startswith("rel") and len(per_kind.setdefault(rec.question_type, [])) < args.n:
            per_kind[rec.question_type].append(rec)
    records = [r for recs in per_kind.values() for r in recs]
    task, model = open_run(args.run)
    replies = task.replies(model.eval(), [as_conversation(r) for r in records])
    rows: dict[str, list] = {}
    for rec, reply in zip(records, replies, strict=True):
        _, i, j = rec.id.split("-")
        kind, colour = (int(v) for v in arrays["questions"][int(i)][int(j)])
        row = {"ok": reply.strip() == rec.answers[0], "reply": reply.strip(), "answer": rec.answers[0]}
        if kind in (3, 4):
            row |= distance_row(kind, colour, arrays["centres"][int(i)], arrays["shapes"][int(i)])
        rows.setdefault(rec.question_type, []).append(row)
    out = {t: summary(rows[t]) for t in ("rel.closest", "rel.furthest") if t in rows}
    if "rel.count" in rows:
        counts = rows["rel.count"]
        confusion = Counter((r["answer"], r["reply"]) for r in counts)
        out["rel.count"] = {
            "n": len(counts),
            "acc": round(float(np.mean([r["ok"] for r in counts])), 3),
            "true_to_replied": {
                t: {p: n for (a, p), n in sorted(confusion.items()) if a == t}
                for t in sorted({r["answer"] for r in counts})
            },
        }
    print(json.dumps({"run": args.run, "split": args.split, **out}, indent=1))
    return out


if __name__ == "__main__":
    main()
