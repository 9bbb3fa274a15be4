"""`mmtune chat`: a terminal conversation with a vlm-sft run, through the real CLI.

The run is configs/tiny/vlm-sft.yaml trained for a few steps on red and blue squares, so its
greedy answers are known ("red" / "blue"); every reply is checked against the task's own `chat`
called on the same history, and that against plain transformers generation.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtune.cli import main
from mmtune.data.images import load_image
from tests.conftest import one_line_error, write_image

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What colour is it?"


def train_chat_run(root: Path) -> Path:
    """configs/tiny/vlm-sft.yaml trained on 8 one-turn conversations (a red or a blue square →
    its colour) in `root`; `root/red.png` and `root/blue.png` are two of its images."""
    rows = []
    for i in range(8):
        colour = "red" if i % 2 else "blue"
        write_image(root / f"s{i}.png", size=(32, 32), color=(200, 30, 30) if i % 2 else (30, 30, 200))
        turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": colour}]
        rows.append({"id": f"s{i}", "image": f"s{i}.png", "conversations": turns})
    (root / "chat.json").write_text(json.dumps(rows))
    (root / "red.png").write_bytes((root / "s1.png").read_bytes())
    (root / "blue.png").write_bytes((root / "s0.png").read_bytes())
    args = [
        "train",
        "-c",
        str(ROOT / "configs" / "tiny" / "vlm-sft.yaml"),
        f"output_dir={root}",
        "name=run",
        f"data.dataset={root / 'chat.json'}",
        "data.val_fraction=0.25",
        "train.max_steps=30",
        "train.lr=3e-3",
        "train.eval_every=0",
    ]
    assert main(args) == 0
    return root / "run"


def chat_world(root: Path) -> dict:
    """The trained run in `root`, its task and model as `open_run` gives them, and its two images."""
    from mmtune.runs import open_run

    run = train_chat_run(root)
    task, model = open_run(run)
    red, blue = load_image(root / "red.png"), load_image(root / "blue.png")
    return {"root": root, "run": run, "task": task, "model": model, "red": red, "blue": blue}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return chat_world(tmp_path_factory.mktemp("chat"))


def user(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": "<image>\n" * images + text}


def reply(world, messages, images, **settings) -> dict:
    settings = {"max_new_tokens": 6, **settings}
    return world["task"].chat(world["model"], messages, images, settings)


def chat_in_process(monkeypatch, capsys, args: list[str], lines: list[str]) -> tuple[int, list[str], str]:
    """`mmtune chat ARGS` in this process with `lines` as its standard input → (code, replies, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(["chat", *args])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def test_task_chat_equals_plain_transformers_generation(world):
    """The task's chat is the run's chat template + greedy `generate` of transformers: rendered,
    processed and generated here without mmtune, a two-image, two-turn conversation gives the
    same tokens; the trained run names the colours it learnt."""
    model, proc = world["model"], world["task"].processor
    first = reply(world, [user(QUESTION, 1)], [world["red"]])
    assert first["text"] == "red" and first["finish_reason"] == "stop"
    assert reply(world, [user(QUESTION, 1)], [world["blue"]])["text"] == "blue"
    messages = [user(QUESTION, 1), {"role": "assistant", "content": "red"}, user("And this one?", 1)]
    images = [world["red"], world["blue"]]
    got = reply(world, messages, images, max_new_tokens=5)
    # the template takes string contents as they are: the <image> marks stay for the processor
    rendered = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = proc(text=[rendered], images=images, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
    new = ids[0, enc["input_ids"].shape[1] :]
    assert got["text"] == proc.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert got["prompt_tokens"] == enc["input_ids"].shape[1] and got["completion_tokens"] == len(new)
    stopped = new[-1].item() == proc.tokenizer.eos_token_id
    assert got["finish_reason"] == ("stop" if stopped else "length")
    cut = reply(world, [user(QUESTION, 1)], [world["red"]], max_new_tokens=1)
    assert cut["completion_tokens"] == 1 and cut["finish_reason"] == "length"


def test_piped_chat_answers_each_turn_as_the_task_does(world):
    """The real CLI with a piped conversation: one reply line per message, each equal to the
    task's chat on the history the CLI should have kept (an /image in the middle, a /reset)."""
    root = world["root"]
    lines = [
        QUESTION,
        f"/image {root / 'blue.png'}",
        "And this one?",
        "/reset",
        f"/image {root / 'blue.png'}",
        QUESTION,
    ]
    env = {
        **os.environ,
        "MMTUNE_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "mmtune.cli",
        "chat",
        "--checkpoint",
        str(world["run"]),
        "--image",
        str(root / "red.png"),
    ]
    proc = subprocess.run(
        [*cmd, "--max-new-tokens", "6"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    got = proc.stdout.splitlines()
    red, blue = world["red"], world["blue"]
    first = reply(world, [user(QUESTION, 1)], [red])["text"]
    history = [user(QUESTION, 1), {"role": "assistant", "content": first}, user("And this one?", 1)]
    second = reply(world, history, [red, blue])["text"]
    # /reset starts over with the --image images, and /image adds one more to the next message
    third = reply(world, [user(QUESTION, 2)], [red, blue])["text"]
    assert got == [first, second, third] == ["red", "blue", "blue"]  # the colour of the last image


def test_sampled_chat_follows_temperature_and_seed(world, monkeypatch, capsys):
    """--temperature samples turn k with --seed + k: each sampled reply equals the task's chat on
    the history kept so far with that seed; the same seed gives the same conversation, greedy (0)
    ignores the seed."""
    root = world["root"]
    args = ["--checkpoint", str(world["run"]), "--image", str(root / "red.png"), "--max-new-tokens", "6"]
    hot = [*args, "--temperature", "2.0", "--seed", "5"]
    lines = [QUESTION, f"/image {root / 'blue.png'}", "And this one?", "Sure?"]
    code, got, _ = chat_in_process(monkeypatch, capsys, hot, lines)
    assert code == 0 and len(got) == 3
    red, blue = world["red"], world["blue"]
    messages, want = [user(QUESTION, 1)], []
    for k, (text, images) in enumerate([(None, [red]), ("And this one?", [red, blue]), ("Sure?", [red, blue])]):
        if text is not None:
            messages += [{"role": "assistant", "content": want[-1]}, user(text, 1 if k == 1 else 0)]
        want.append(reply(world, messages, images, temperature=2.0, seed=5 + k)["text"])
    assert got == want
    assert got[0] != "red"  # sampled, not greedy
    assert chat_in_process(monkeypatch, capsys, hot, lines)[1] == got
    code, greedy, _ = chat_in_process(monkeypatch, capsys, [*args, "--seed", "9"], [QUESTION])
    assert code == 0 and greedy == ["red"]


def test_missing_image_is_a_one_line_error(world, monkeypatch, capsys):
    """--image that does not exist: exit 2 with one line naming it, before any model loads; an
    /image that does not exist mid-conversation: one error line, and the chat goes on as before."""
    missing = world["root"] / "nope.png"
    code, out, _ = chat_in_process(
        monkeypatch, capsys, ["--checkpoint", str(world["run"]), "--image", str(missing)], []
    )
    assert code == 2 and out == []
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["chat", "--checkpoint", str(world["run"]), "--image", str(missing)]) == 2
    one_line_error(capsys, "nope.png", "missing")
    args = ["--checkpoint", str(world["run"]), "--image", str(world["root"] / "red.png"), "--max-new-tokens", "6"]
    code, out, err = chat_in_process(monkeypatch, capsys, args, [f"/image {missing}", QUESTION, "/exit", "never read"])
    assert code == 0 and out == ["red"]  # the missing image was not attached: one image, one mark
    assert err.strip().count("\n") == 0 and "nope.png: missing" in err and "Traceback" not in err


def test_non_vlm_run_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """A run whose task does not chat (a tiny-clip contrastive run): exit 2, one line."""
    from tests.test_serve import make_run

    run = make_run(tmp_path / "clip")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", "--checkpoint", str(run)]) == 2
    one_line_error(capsys, "does not chat", "vlm-sft")


def test_a_turn_past_the_runs_length_is_refused_and_the_history_kept(world, monkeypatch, capsys):
    """With options.max_length=30 the first turn (25 tokens) fits and the second, which carries
    the first as its history, does not (alone it would: 25 tokens): one error line; the chat goes
    on, and after /reset the same question is answered again."""
    args = ["--checkpoint", str(world["run"]), "--image", str(world["root"] / "red.png"), "options.max_length=30"]
    code, out, err = chat_in_process(monkeypatch, capsys, args, [QUESTION, QUESTION, "/reset", QUESTION])
    assert code == 0 and out == ["red", "red"]
    errors = [line for line in err.splitlines() if line.startswith("mmtune: error:")]
    assert len(errors) == 1 and "options.max_length=30" in errors[0]
