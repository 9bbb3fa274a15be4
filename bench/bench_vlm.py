"""Multimodal-LLM fine-tuning benchmarks (`task: vlm-sft`), measured side by side → runs/bench/vlm.json.

1. throughput: mmtune's Trainer vs TRL's `SFTTrainer` (with its own vision-language collator,
   `DataCollatorForVisionLanguageModeling`) on the same random `tiny-llava` weights, the same
   built-in `shapes` questions as one user/assistant exchange each, the same batch size, max
   length, precision (fp32), optimizer (fused AdamW, lr, betas, weight decay, gradient clipping,
   cosine schedule), loss on the assistant's reply only, gradient checkpointing off for both. The
   two are alternated over `--rounds`; each round times the optimizer steps after `--warmup`
   (start-up, the first steps and checkpoint saving are not timed; neither side saves). Tokens
   are the non-padding tokens (`attention_mask` ones, image tokens included) of the batches each
   side's own collator made, counted the same way for both; `throughput_ratio` is the median
   over the rounds of mmtune's tokens/s over TRL's.
2. memory: the peak live tensor bytes of one training step (the profiler's allocation events on
   CPU plus the parameters, gradients and optimizer state; the allocator's peak on CUDA — what
   `mmtune estimate` measures), with LoRA on the language model vs full fine-tuning; and the
   bytes of parameters + gradients + AdamW moments alone (the part LoRA shrinks).
3. padding: the share of padding tokens per batch of mmtune's loader (batches padded to their
   longest sample), vs the same batches padded to `options.max_length`.

Usage: MMTUNE_THREADS=1 python bench/bench_vlm.py [--batch 16] [--steps 24] [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

# isort: off
import mmtune  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch

# isort: on

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LR, BETAS, WEIGHT_DECAY, CLIP = 1e-3, (0.9, 0.98), 0.1, 1.0


def counting(collate, counts: list):
    """`collate` that also appends each batch's (non-padding tokens, all tokens, rows) to `counts`."""

    def wrapped(items):
        batch = collate(items)
        mask = batch["attention_mask"]
        counts.append((int(mask.sum()), int(mask.numel()), len(mask)))
        return batch

    return wrapped


def vlm_config(args, out: str, **options):
    from mmtune.config import Config

    return Config(
        task="vlm-sft",
        name="bench-vlm",
        model={"name": "tiny-llava"},
        data={"dataset": args.dataset, "batch_size": args.batch, "num_workers": 0},
        train={
            "max_steps": args.steps,
            "lr": LR,
            "betas": BETAS,
            "weight_decay": WEIGHT_DECAY,
            "clip_grad": CLIP,
            "warmup_steps": 0,
            "precision": "fp32",
            "log_every": 10**6,
            "progress": False,
        },
        options={"max_length": args.max_length, **options},
        output_dir=out,
    )


def throughput(counts: list, stamps: list, warmup: int) -> dict:
    """Tokens/s and samples/s over the optimizer steps after `warmup` (batch i feeds step i)."""
    steps = len(stamps)
    seconds = stamps[-1] - stamps[warmup - 1]
    tokens = sum(c[0] for c in counts[warmup:steps])
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "steps": steps - warmup}


def mmtune_run(model, task, records, args) -> dict:
    """mmtune's Trainer on `records`: tokens/s after the warm-up steps."""
    from mmtune.engine import Trainer, make_accelerator

    class Timed(Trainer):
        def _optimizer_step(self, bad: bool) -> None:
            super()._optimizer_step(bad)
            stamps.append(time.perf_counter())

        def save(self, name: str = "last") -> None:
            pass  # as TRL's save_strategy="no": no checkpoint in a timed run

    counts, stamps = [], []
    task.collate = counting(type(task).collate.__get__(task), counts)
    with tempfile.TemporaryDirectory() as out:
        cfg = vlm_config(args, out)
        trainer = Timed(cfg, task, model, make_accelerator(cfg, Path(out)), (records, []), out)
        trainer.fit()
    return {**throughput(counts, stamps, args.warmup), "batches": counts[: len(stamps)]}


def trl_rows(records):
    """The records as TRL's conversational prompt–completion rows: a `datasets.Dataset` of indices
    whose transform builds each row (PIL images) from the same in-memory records mmtune reads."""
    from datasets import Dataset
    from PIL import Image

    from mmtune.data.conversations import IMAGE, as_conversation

    convs = [as_conversation(r) for r in records]

    def rows(batch):
        out = {"images": [], "prompt": [], "completion": []}
        for i in batch["idx"]:
            user, reply = convs[i].messages
            out["images"].append([Image.fromarray(im).convert("RGB") for im in convs[i].images])
            out["prompt"].append([{"role": "user", "content": user["content"].replace(IMAGE, "").strip()}])
            out["completion"].append([{"role": "assistant", "content": reply["content"]}])
        return out

    ds = Dataset.from_dict({"idx": list(range(len(convs)))})
    ds.set_transform(rows)
    return ds


def trl_run(model, processor, rows, args) -> dict:
    """TRL's SFTTrainer as its users call it for a VLM: tokens/s after the warm-up steps."""
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    counts, stamps = [], []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            max_length=args.max_length,
            learning_rate=LR,
            adam_beta1=BETAS[0],
            adam_beta2=BETAS[1],
            weight_decay=WEIGHT_DECAY,
            max_grad_norm=CLIP,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            bf16=False,  # TRL's default is bf16; fp32 on both sides
            gradient_checkpointing=False,  # TRL's default is on; off on both sides
            remove_unused_columns=False,  # as TRL's VLM example: the collator reads the images
            dataloader_num_workers=0,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            seed=0,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=processor)
        trainer.data_collator = counting(trainer.data_collator, counts)  # TRL's own collator, counted
        trainer.add_callback(Stamp())
        trainer.train()
    return throughput(counts, stamps, args.warmup)


def memory(args, records) -> dict:
    """Peak live bytes of one training step: full fine-tuning vs LoRA on the language model."""
    from mmtune.estimate import make_batch, measure_step
    from mmtune.tasks import Context, get_task

    out = {}
    settings = {
        "full": {},  # the task's defaults: vision tower frozen, projector and language model trained
        "full_with_vision": {"freeze_vision": False},
        "lora": {"lora_r": args.lora_r},  # projector trained, the language model through adapters
    }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, options in settings.items():
        cfg = vlm_config(args, "", **options)
        task = get_task("vlm-sft")(Context(cfg, device=device))
        torch.manual_seed(0)
        model = task.build().to(device).train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)
        batch = make_batch(task, records, args.batch, device)
        step = measure_step(model, task, batch, opt, Context(cfg, device=device).autocast, device, repeats=1)
        size = sum(p.numel() * p.element_size() for p in trainable)
        moments = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values())
        out[name] = {
            "peak_bytes": step["peak_bytes"],
            # what LoRA changes: parameters + a gradient per trainable parameter + AdamW's moments
            "state_bytes": sum(p.numel() * p.element_size() for p in model.parameters()) + size + moments,
            "trainable_params": sum(p.numel() for p in trainable),
            "params": sum(p.numel() for p in model.parameters()),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=4, help="first steps of each run not timed")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--dataset", default="shapes")
    p.add_argument("--out", default="runs/bench/vlm.json")
    args = p.parse_args()
    if not 0 < args.warmup < args.steps:
        p.error("--warmup must be at least 1 and below --steps")

    import transformers
    import trl
    from transformers.utils import logging as hf_logging

    from mmtune.api import configure_threads
    from mmtune.data import load_splits
    from mmtune.tasks import Context, get_task

    hf_logging.set_verbosity_error()
    configure_threads()
    cfg = vlm_config(args, "")
    splits = load_splits(cfg.data)
    records = splits.train[: args.batch * args.steps]  # one epoch: both sides see the same samples
    task = get_task("vlm-sft")(Context(cfg))
    torch.manual_seed(0)
    model = task.build()  # vision tower frozen, projector and language model trained (the defaults)
    rows = trl_rows(records)

    load_start = os.getloadavg()[0]
    ours, theirs, ratios = [], [], []
    for _ in range(args.rounds):  # alternated: a shared machine's load hits both alike
        fresh = get_task("vlm-sft")(Context(cfg))
        fresh.processor = task.processor  # the benchmark's model, built once for both sides
        a = mmtune_run(copy.deepcopy(model), fresh, records, args)
        b = trl_run(copy.deepcopy(model), task.processor, rows, args)
        ours.append(a)
        theirs.append(b)
        ratios.append(a["tokens_per_s"] / b["tokens_per_s"])
        print(f"round {len(ratios)}: mmtune {a['tokens_per_s']:,.0f} tokens/s, TRL {b['tokens_per_s']:,.0f}")

    batches = ours[0]["batches"]
    pad_share = [1 - real / total for real, total, _ in batches]
    to_max = [1 - real / (rows * args.max_length) for real, _, rows in batches]
    mem = memory(args, records)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"),
        "command": "make bench-vlm",
        "model": "tiny-llava (random weights; vision tower frozen, projector and language model trained)",
        "dataset": args.dataset,
        "batch": args.batch,
        "steps": args.steps,
        "timed_steps": args.steps - args.warmup,
        "rounds": args.rounds,
        "max_length": args.max_length,
        "precision": "fp32",
        "tokens": "non-padding tokens (attention_mask ones, image tokens included) of each side's batches",
        "throughput_ratio": statistics.median(ratios),
        "throughput_ratios": ratios,
        "mmtune_tokens_per_s": statistics.median(r["tokens_per_s"] for r in ours),
        "trl_tokens_per_s": statistics.median(r["tokens_per_s"] for r in theirs),
        "mmtune_tokens_per_s_rounds": [r["tokens_per_s"] for r in ours],
        "trl_tokens_per_s_rounds": [r["tokens_per_s"] for r in theirs],
        "load_average_start_end": [load_start, os.getloadavg()[0]],  # 1-minute; the machine may be shared
        "mmtune_tokens_per_round": [r["tokens"] for r in ours],
        "trl_tokens_per_round": [r["tokens"] for r in theirs],
        "padding_share": statistics.mean(pad_share),
        "padding_share_max": max(pad_share),
        "padding_share_if_padded_to_max_length": statistics.mean(to_max),
        "length_grouped_sampler": "none in vlm-sft: batches are drawn at random and padded to their longest sample",
        "memory_method": "peak live tensor bytes of one training step (fused AdamW), as `mmtune estimate`: "
        "profiler allocation events + parameters, gradients and optimizer state (CPU); allocator peak (CUDA)",
        "memory": mem,
        "lora_r": args.lora_r,
        "memory_ratio_lora_vs_full": mem["lora"]["peak_bytes"] / mem["full"]["peak_bytes"],
        "memory_ratio_lora_vs_full_with_vision": mem["lora"]["peak_bytes"] / mem["full_with_vision"]["peak_bytes"],
        "state_memory_ratio_lora_vs_full": mem["lora"]["state_bytes"] / mem["full"]["state_bytes"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result.items():
        if isinstance(v, float):
            print(f"{k:<40} {v:,.3f}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
