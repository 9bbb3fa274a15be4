"""A small causal language model of the built-in scenes' language, trained from scratch.

The language half of `make vlm-shapes`' LLaVA: a word-level tokenizer over the `shapes` questions,
answers and captions (and the chat template's words), and a few-layer Llama trained on the train
split's text alone — each scene as a conversation ("Describe the image." → its caption, then its
questions and answers), so the model knows the words, the turn layout and the answers' priors
before it sees an image. Saved as a plain transformers folder (`AutoModelForCausalLM` +
`AutoTokenizer` with the chat template) that `options.language` of `task: vlm-sft` composes.

    python -m mmtune.models.scene_lm OUT [--steps N] [--hidden D] [--layers L]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from mmtune.data.builtin import shapes
from mmtune.data.conversations import CAPTION_PROMPT, IMAGE
from mmtune.models.vlm import CHAT_TEMPLATE

SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# The weights' initial scale (transformers' default is 0.02). At 0.02 the composed LLaVA's caption
# loss stays at the language prior: its attention logits start near zero, uniform over the 36 image
# tokens, and the colour words never find their objects within the budget; at 0.09 they do
# (bench/vlm_binding.py). The LLaVA's projector is drawn at the same scale (the text config's).
INIT_STD = 0.09
WORD = re.compile(r"\w+|[^\w\s]+")  # the pre-tokenizer's (Whitespace) split: words, punctuation runs


def scene_words() -> list[str]:
    """Every word of the scenes' language: templates, colours, shapes, answers, captions, the chat
    template's roles — in a fixed order (the vocabulary does not depend on any generated data)."""
    text = [t for _, t in shapes.NONREL + shapes.REL]
    text += shapes.COLORS + shapes.SHAPES + shapes.ANSWERS + [CAPTION_PROMPT]
    text += ["a an at the and , .", "USER: ASSISTANT: SYSTEM:"]
    words: list[str] = []
    for line in text:
        for w in WORD.findall(line.replace("{}", " ")):
            if w not in words:
                words.append(w)
    return words


def word_tokenizer():
    """A word-level `PreTrainedTokenizerFast` of `scene_words()` (unknown words → <unk>), with the
    LLaVA-1.5-style chat template and an `<image>` token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS.values())}
    for w in scene_words():
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins with spaces, "left ," → "left,"
    tok = PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=True, **SPECIALS)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def scene_conversations(split: str = "train", seed: int = 0) -> list[list[dict]]:
    """One text-only conversation per scene of the built-in `shapes` split."""
    arrays = shapes.load_arrays("shapes", seed)[split]
    kinds = shapes.NONREL + shapes.REL
    out = []
    for i in range(len(arrays["images"])):
        centres, kind_shapes = arrays["centres"][i], arrays["shapes"][i]
        turns = [
            {"role": "user", "content": CAPTION_PROMPT},
            {"role": "assistant", "content": shapes.caption(centres, kind_shapes)},
        ]
        for kind, colour in arrays["questions"][i]:
            turns.append({"role": "user", "content": kinds[kind][1].format(shapes.COLORS[colour])})
            turns.append({"role": "assistant", "content": shapes.answer(int(kind), int(colour), centres, kind_shapes)})
        out.append(turns)
    return out


def build_lm(tok, hidden: int, layers: int, heads: int, init_std: float = INIT_STD):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=init_std,
    )
    return LlamaForCausalLM(config)


def train_scene_lm(
    out: str | Path,
    steps: int = 200,
    batch_size: int = 32,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    lr: float = 2e-3,
    seed: int = 0,
    init_std: float = INIT_STD,
    log=print,
) -> dict:
    """Train the scenes' LM and save it (model, tokenizer, chat template) under `out`; returns
    {"steps", "seconds", "first_loss", "loss", "params"} (also written to `out/train.json`)."""
    torch.manual_seed(seed)
    tok = word_tokenizer()
    model = build_lm(tok, hidden, layers, heads, init_std)
    texts = [tok.apply_chat_template(c, tokenize=False) for c in scene_conversations("train")]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    unknown = sum(i.count(tok.unk_token_id) for i in ids)
    if unknown:
        raise RuntimeError(f"{unknown} words of the scenes' text are missing from the vocabulary")
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    start, loss, first = time.perf_counter(), float("nan"), None
    for step in range(steps):
        pick = rng.choice(len(ids), batch_size, replace=False)
        longest = max(len(ids[k]) for k in pick)
        x = torch.full((batch_size, longest), tok.pad_token_id)
        mask = torch.zeros_like(x)
        for row, k in enumerate(pick):
            x[row, : len(ids[k])] = torch.tensor(ids[k])
            mask[row, : len(ids[k])] = 1
        labels = x.masked_fill(mask == 0, -100)
        out_ = model(input_ids=x, attention_mask=mask, labels=labels)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = out_.loss.item()
        first = loss if first is None else first
        if step % 20 == 0 or step == steps - 1:
            log(f"scene LM step {step + 1}/{steps} loss {loss:.3f}")
    seconds = time.perf_counter() - start
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    summary = {
        "steps": steps,
        "seconds": round(seconds, 1),
        "first_loss": first,
        "loss": loss,
        "params": sum(p.numel() for p in model.parameters()),
    }
    (out / "train.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmtune.models.scene_lm", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write the model and tokenizer to")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=INIT_STD, help="the weights' initial standard deviation")
    a = p.parse_args(argv)
    summary = train_scene_lm(a.out, a.steps, a.batch_size, a.hidden, a.layers, a.heads, a.lr, a.seed, a.init_std)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
