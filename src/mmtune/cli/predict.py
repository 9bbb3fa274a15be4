"""`mmtune predict`: answer a question about an image (or caption it) with a trained run;
`mmtune compare-runs`: gather figures of several runs into one run's metrics.json and report."""

from __future__ import annotations

import json
from pathlib import Path

from mmtune.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="a trained run's prediction for an image (its task decides)",
        description="Answers --question (vqa), captions (caption), classifies (classify), "
        "scores --labels (contrastive)…: whatever the run's task predicts. Options of the run "
        "can be overridden: options.decode=beam options.beams=3.",
    )
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--question", help="a question about the image (vqa runs)")
    p.add_argument(
        "--history", action="append", default=[], help="a prior dialog turn ('question answer'); repeat, oldest first"
    )
    p.add_argument("--labels", nargs="+", help="candidate labels to score (contrastive runs)")
    p.add_argument("--json", action="store_true", help="print the whole output as JSON")
    p.set_defaults(func=cmd_predict)
    c = sub.add_parser("compare-runs", help="copy prefixed figures of runs into one metrics.json")
    c.add_argument("--into", required=True, help="run folder whose metrics.json gains the figures")
    c.add_argument(
        "--add", action="append", default=[], metavar="PREFIX=RUN", help="copy RUN's metrics as PREFIX.<key>; repeat"
    )
    c.add_argument(
        "--keys", help="only keys starting with this (default: the prefix of the --into run's task metric, e.g. vqa.)"
    )
    c.set_defaults(func=cmd_compare)


def cmd_predict(args, extra) -> int:
    from mmtune.cli.common import overrides
    from mmtune.data.images import BadImage, load_image
    from mmtune.runs import open_run, resolve_checkpoint, run_config

    ckpt = Path(args.checkpoint)
    cfg = run_config(resolve_checkpoint(ckpt)[0], overrides(extra))
    try:
        image = load_image(args.image)
    except BadImage as e:
        raise UserError(f"cannot read --image: {e}") from None
    given = {"question": args.question, "history": args.history or None, "labels": args.labels}
    inputs = {"image": image, **{k: v for k, v in given.items() if v is not None}}
    task, model = open_run(ckpt, cfg)
    for out in task.predict(model, [inputs]):
        print(json.dumps(out) if args.json else task.format_prediction(out))
    return 0


def cmd_compare(args, extra) -> int:
    from mmtune.report import write_report
    from mmtune.runs import resolve_checkpoint, run_config
    from mmtune.tasks import get_task

    into = Path(args.into)
    target = into / "metrics.json"
    if not target.is_file():
        raise UserError(f"{target} not found: train that run first")
    metric = get_task(run_config(resolve_checkpoint(into)[0]).task).metric
    keys = args.keys or metric.split(".")[0] + "."
    metrics = json.loads(target.read_text())
    added = {}
    for spec in args.add:
        prefix, _, run = spec.partition("=")
        src = Path(run) / "metrics.json"
        if not prefix or not src.is_file():
            raise UserError(f"--add {spec}: write PREFIX=RUN, RUN holding a metrics.json")
        added[prefix] = (run, json.loads(src.read_text()))
        for k, v in added[prefix][1].items():
            if k.startswith(keys) or k in ("train.seconds", "train.steps"):
                metrics[f"{prefix}.{k}"] = v
    target.write_text(json.dumps(metrics, indent=2) + "\n")
    figures = [k for k, v in metrics.items() if k.startswith(keys) and k != metric and isinstance(v, float)]
    shown = [metric, *figures[:3], "train.seconds"]
    rows = [[prefix, run] + [theirs.get(k) for k in shown] for prefix, (run, theirs) in added.items()]
    (into / "tables").mkdir(exist_ok=True)
    table = {"title": "Compared runs", "columns": ["name", "run", *shown], "rows": rows}
    (into / "tables" / "compare.json").write_text(json.dumps(table, indent=2))
    write_report(into)
    print(f"{len(rows)} runs added to {target}")
    return 0
