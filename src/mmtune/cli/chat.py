"""`mmtune chat`: a multi-turn conversation with a multimodal LLM run in the terminal.

Each line read is the user's next message; the reply is printed on its own. The conversation so
far goes with every turn (through the run's chat template). `/image PATH` attaches an image to
the next message, `/reset` starts over, `/exit` or end of input ends. A turn that cannot be
answered (an unreadable image, a conversation past the run's length) prints one error line and
leaves the conversation as it was.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmtune.errors import UserError

HELP = "commands: /image PATH (attach to the next message), /reset, /exit"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="talk with a multimodal LLM run (vlm-sft) in the terminal",
        description="Reads the user's messages line by line from standard input and prints each "
        f"reply; the history is kept. {HELP}. Options of the run can be overridden: "
        "options.max_length=4096.",
    )
    p.add_argument("--checkpoint", required=True, help="vlm-sft run folder or checkpoint folder")
    p.add_argument("--image", action="append", default=[], help="image for the first message; repeat for several")
    p.add_argument("--system", help="a system message opening the conversation")
    p.add_argument(
        "--max-new-tokens", type=int, help="longest reply in tokens (default: the run's options.max_new_tokens)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (turn k samples with seed + k)")
    p.set_defaults(func=cmd_chat)


def read_image(path: str):
    """An image file as an RGB PIL image; a one-line error naming it otherwise."""
    from mmtune.data.images import BadImage, load_image

    try:
        return load_image(path)
    except BadImage as e:
        raise UserError(f"cannot read image {e}") from None


class Conversation:
    """The turns so far, their images, and the images waiting for the next user message."""

    def __init__(self, system: str | None, images: list):
        self.system, self.first_images = system, images
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list = []
        self.pending: list = list(self.first_images)

    def ask(self, text: str) -> tuple[list[dict], list]:
        """(messages, images) with `text` (and the waiting images) as the next user message."""
        from mmtune.data.conversations import IMAGE

        content = f"{IMAGE}\n" * len(self.pending) + text
        return self.messages + [{"role": "user", "content": content}], self.images + self.pending

    def answered(self, messages: list[dict], images: list, reply: str) -> None:
        self.messages = messages + [{"role": "assistant", "content": reply}]
        self.images, self.pending = images, []


def cmd_chat(args, extra) -> int:
    from mmtune.cli.common import overrides, threads
    from mmtune.runs import open_run, resolve_checkpoint, run_config
    from mmtune.tasks import get_task

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 or more (got {args.temperature})")
    images = [read_image(p) for p in args.image]
    ckpt = Path(args.checkpoint)
    cfg = run_config(resolve_checkpoint(ckpt)[0], overrides(extra))
    if "chat" not in get_task(cfg.task).routes:
        raise UserError(f"{ckpt} is a {cfg.task} run, which does not chat: train a vlm-sft run")
    threads()
    task, model = open_run(ckpt, cfg)
    conv = Conversation(args.system, images)
    tty = sys.stdin.isatty()
    if tty:
        print(f"chatting with {ckpt} ({HELP}; Ctrl-D ends)", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> " if tty else "").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command == "/exit":
                return 0
            if command == "/reset":
                conv.reset()
                print("(conversation reset)", file=sys.stderr)
            elif command == "/image" and rest.strip():
                try:
                    conv.pending.append(read_image(rest.strip()))
                except UserError as e:
                    print(f"mmtune: error: {e}", file=sys.stderr)
            else:
                print(f"mmtune: error: unknown command {line!r} ({HELP})", file=sys.stderr)
            continue
        messages, turn_images = conv.ask(line)
        settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed + turn}
        try:
            out = task.chat(model, messages, turn_images, settings)
        except UserError as e:
            print(f"mmtune: error: {e} (/reset starts a new conversation)", file=sys.stderr)
            continue
        conv.answered(messages, turn_images, out["text"])
        turn += 1
        print(out["text"], flush=True)
