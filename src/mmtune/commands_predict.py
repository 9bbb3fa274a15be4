"""`mmtune predict`: answer a question about an image (or caption it) with a trained run;
`mmtune compare-runs`: gather figures of several runs into one run's metrics.json and report."""

from __future__ import annotations

import json
from pathlib import Path

from mmtune.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="answer --question about --image (or caption it)")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--question", help="question; without it the image is captioned")
    p.add_argument("--history", action="append", default=[],
                   help="a prior dialog turn ('question answer'); repeat, oldest first")  # fmt: skip
    p.add_argument("--beams", type=int, default=0, help="captions: beam search with this width")
    p.set_defaults(func=cmd_predict)
    c = sub.add_parser("compare-runs", help="copy prefixed figures of runs into one metrics.json")
    c.add_argument("--into", required=True, help="run folder whose metrics.json gains the figures")
    c.add_argument("--add", action="append", default=[], metavar="PREFIX=RUN",
                   help="copy RUN's metrics as PREFIX.<key>; repeat")  # fmt: skip
    c.add_argument("--keys", default="vqa.", help="only keys starting with this")
    c.set_defaults(func=cmd_compare)


def _run_dir(checkpoint: Path) -> Path:
    for cand in (checkpoint, checkpoint.parent.parent):
        if (cand / "config.yaml").is_file():
            return cand
    raise UserError(f"{checkpoint}: no config.yaml beside the checkpoint (not a run folder)")


def cmd_predict(args, extra) -> int:
    import torch

    from mmtune.config import load_config
    from mmtune.data.images import BadImage, load_image
    from mmtune.models import load_run
    from mmtune.tasks import Context, get_task

    ckpt = Path(args.checkpoint)
    model, proc = load_run(ckpt)
    heads = getattr(model, "head", {})
    saved = load_config(_run_dir(ckpt) / "config.yaml")
    try:
        image = load_image(args.image)
    except BadImage as e:
        raise UserError(f"cannot read --image: {e}") from None
    if args.question:
        if "vqa" not in heads and "answer" not in heads:
            raise UserError(f"{ckpt} has no answer head: train it with task vqa")
        opts = {"head": "classifier" if "vqa" in heads else "generator"}
        task_name, inputs = "vqa", [{"image": image, "question": args.question,
                                     "history": args.history}]  # fmt: skip
    else:
        if "caption" not in heads:
            raise UserError(f"{ckpt} has no caption head: pass --question, or train task caption")
        opts = {"decode": "beam", "beams": args.beams} if args.beams else {}
        task_name, inputs = "caption", [{"image": image}]
    cfg = saved.model_copy(update={"task": task_name, "options": opts})
    task = get_task(task_name)(Context(cfg, proc, None, torch.device("cpu")))
    model.eval()
    for out in task.predict(model, inputs):
        print(out.get("answer", out.get("caption")))
    return 0


def cmd_compare(args, extra) -> int:
    from mmtune.report import write_report

    into = Path(args.into)
    target = into / "metrics.json"
    if not target.is_file():
        raise UserError(f"{target} not found: train that run first")
    metrics = json.loads(target.read_text())
    rows = []
    for spec in args.add:
        prefix, _, run = spec.partition("=")
        src = Path(run) / "metrics.json"
        if not prefix or not src.is_file():
            raise UserError(f"--add {spec}: write PREFIX=RUN, RUN holding a metrics.json")
        theirs = json.loads(src.read_text())
        for k, v in theirs.items():
            if k.startswith(args.keys) or k in ("train.seconds", "train.steps"):
                metrics[f"{prefix}.{k}"] = v
        rows.append([prefix, run] + [theirs.get(k) for k in ("vqa.acc", "vqa.nonrel.acc",
                                                            "vqa.rel.acc", "train.seconds")])  # fmt: skip
    target.write_text(json.dumps(metrics, indent=2) + "\n")
    (into / "tables").mkdir(exist_ok=True)
    table = {"title": "Compared runs (test split)",
             "columns": ["name", "run", "vqa.acc", "vqa.nonrel.acc", "vqa.rel.acc", "train s"],
             "rows": rows}  # fmt: skip
    (into / "tables" / "compare.json").write_text(json.dumps(table, indent=2))
    write_report(into)
    print(f"{len(rows)} runs added to {target}")
    return 0
