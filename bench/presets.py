"""Model-size presets for the device benchmarks: `bench_train.py --preset vit-b16`, `bench_serve.py`.

`vit-b16` is CLIP ViT-B/16's geometry: 224 px images in 16 px patches, 12 × 768 vision and text
towers (12 heads), 77-token captions, 512-d embeddings, random-initialised (speed does not
depend on the weights). `--tiny` keeps the code path and shrinks every size, for a CPU smoke
test. The same script runs unchanged on CUDA: bf16 autocast, fused AdamW, batch sized to the
device memory, MFU against the device's dense bf16 peak.
"""

from __future__ import annotations

import os
import resource
import time

import torch

SIZES = {
    "vit-b16": {
        "image": 224,
        "patch": 16,
        "hidden": 768,
        "layers": 12,
        "heads": 12,
        "text_layers": 12,
        "max_len": 77,
        "embed": 512,
    },
    "tiny": {
        "image": 32,
        "patch": 16,
        "hidden": 64,
        "layers": 2,
        "heads": 2,
        "text_layers": 2,
        "max_len": 16,
        "embed": 32,
    },
}

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s, no sparsity).
BF16_PEAKS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
]


def device_bf16_peak(device: torch.device) -> tuple[float, str]:
    """(FLOP/s, where it comes from): the data-sheet peak of a known GPU, else a measured matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in BF16_PEAKS:
            if key in name:
                return peak, f"data sheet ({name})"
    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        a @ a
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, f"measured {n}² bf16 matmul"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def auto_batch(device: torch.device, tiny: bool) -> int:
    """The largest batch that fits comfortably: 256 per 80 GiB of GPU memory; 8 on a CPU."""
    if device.type != "cuda" or tiny:
        return 8
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return max(16, int(256 * gib / 80) // 16 * 16)


def dual_encoder(s: dict, vocab_size: int):
    """A random-initialised ViT + BERT `VisionTextDualEncoderModel` of the given sizes."""
    from transformers import (
        BertConfig,
        BertModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        ViTConfig,
        ViTModel,
    )

    h, heads = s["hidden"], s["heads"]
    vit = ViTConfig(
        image_size=s["image"],
        patch_size=s["patch"],
        hidden_size=h,
        num_hidden_layers=s["layers"],
        num_attention_heads=heads,
        intermediate_size=4 * h,
    )
    bert = BertConfig(
        vocab_size=vocab_size,
        hidden_size=h,
        num_hidden_layers=s["text_layers"],
        num_attention_heads=heads,
        intermediate_size=4 * h,
        max_position_embeddings=s["max_len"],
    )
    torch.manual_seed(0)
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(vit, bert, projection_dim=s["embed"])
    return VisionTextDualEncoderModel(cfg, vision_model=ViTModel(vit), text_model=BertModel(bert))


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024, "process peak RSS (CPU)"


def train_preset(name: str, tiny: bool, steps: int, batch: int | None, tokenizer) -> dict:
    """mmtune's Trainer on the preset: samples/s, peak memory, MFU against the bf16 peak."""
    import tempfile

    from mmtune.config import load_config
    from mmtune.data.builtin.digits import digits_splits
    from mmtune.engine import Trainer
    from mmtune.estimate import make_batch, step_flops
    from mmtune.models.dual import HFDualEncoder
    from mmtune.models.load import Processor
    from mmtune.tasks import Context
    from mmtune.tasks.contrastive import ContrastiveTask

    s = SIZES["tiny" if tiny else name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = batch or auto_batch(device, tiny)
    records = digits_splits(0)["train"]
    workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    proc = Processor(tokenizer, s["image"], max_length=s["max_len"], padding="max_length")
    model = HFDualEncoder(dual_encoder(s, tokenizer.vocab_size))
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            None,
            {
                "data.batch_size": batch,
                "train.max_steps": steps,
                "train.precision": "bf16",
                "train.warmup_steps": 0,
                "train.log_every": 10**6,
                "train.progress": False,
                "data.num_workers": workers,
                "output_dir": out,
            },
        )
        task = ContrastiveTask(Context(cfg, proc, device=device))
        warm = Trainer(cfg, task, model, records, [], out)
        task.ctx.device = warm.acc.device
        warm.total_steps = 3  # first steps pay for allocator growth and kernel selection
        warm.fit()
        flops = step_flops(warm.model, task, make_batch(task, records, batch, device))
        trainer = Trainer(cfg, task, model, records, [], out)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        trainer.fit()
        _sync(device)
        sps = steps * batch / (time.perf_counter() - start)
        mem, mem_source = _peak_memory(device)
    peak, peak_source = device_bf16_peak(device)
    return {
        "preset": name,
        "tiny": tiny,
        "device": _device_name(device),
        "precision": trainer.precision,
        "batch": batch,
        "steps": steps,
        "image": s["image"],
        "tokens": s["max_len"],
        "samples_per_s": sps,
        "flops_per_sample": flops / batch,
        "peak_memory_bytes": mem,
        "peak_memory_source": mem_source,
        "bf16_peak_flops": peak,
        "bf16_peak_source": peak_source,
        "mfu": flops * sps / batch / peak,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def serve_images(name: str, tiny: bool, batch: int, rounds: int = 5) -> dict:
    """images/s of the preset's image encoder at the server's batch size (bf16 on a GPU)."""
    from contextlib import nullcontext

    from mmtune.models.dual import HFDualEncoder

    s = SIZES["tiny" if tiny else name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = HFDualEncoder(dual_encoder(s, 30522)).to(device).eval()
    px = torch.randn(batch, 3, s["image"], s["image"], device=device)
    bf16 = device.type == "cuda"
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    best = 0.0
    with torch.inference_mode(), cast:
        model.encode_image(px)  # warm-up
        for _ in range(rounds):
            _sync(device)
            start = time.perf_counter()
            model.encode_image(px)
            _sync(device)
            best = max(best, batch / (time.perf_counter() - start))
    mem, mem_source = _peak_memory(device)
    return {
        "preset": name,
        "tiny": tiny,
        "device": _device_name(device),
        "precision": "bf16" if bf16 else "fp32",
        "batch": batch,
        "image": s["image"],
        "images_per_s": best,
        "peak_memory_bytes": mem,
        "peak_memory_source": mem_source,
    }
