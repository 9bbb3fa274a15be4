"""`mmtune runs upgrade`: bring a model folder written by an older mmtune up to date."""

from __future__ import annotations

from mmtune.errors import UserError


def add_parser(sub) -> None:
    r = sub.add_parser("runs", help="manage run folders")
    rs = r.add_subparsers(dest="runs_command", required=True)
    u = rs.add_parser("upgrade", help="record the task in a run or exported model folder")
    u.add_argument("run", nargs="+", help="run folder, checkpoint or exported model folder")
    u.set_defaults(func=cmd_upgrade)


def cmd_upgrade(args, extra) -> int:
    from mmtune.runs import upgrade

    if extra:
        raise UserError(f"unexpected arguments: {' '.join(extra)}")
    for run in args.run:
        print(f"{run}: task {upgrade(run)}")
    return 0
