"""Predict a config's peak memory and step time from a few measured micro-steps; suggest settings.

Peak memory is the peak of live tensor bytes during a training step (parameters, gradients,
optimizer state, activations): on CUDA from the allocator's statistics, on CPU from the
profiler's allocation events. It is measured at three small batch sizes and fitted as
`a + b·B + c·B²` (activations grow with B, the contrastive logits with B²); the step time as
`a + b·B`. FLOPs per sample come from `torch.utils.flop_counter` on one step.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

__all__ = ["estimate", "format_estimate", "live_peak_bytes", "measure_step"]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _optimizer_bytes(opt) -> int:
    return sum(_tensor_bytes(s.values()) for s in opt.state.values())


def live_peak_bytes(fn, device: torch.device, baseline: int) -> int:
    """Run fn(); the peak of live tensor bytes during it, counting `baseline` bytes alive before.

    CUDA: the allocator's peak. CPU: the running sum of the profiler's allocation events.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return baseline + peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: the profiler's native library prints start-up notes there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _forward_backward(model, task, batch, autocast) -> None:
    with autocast():
        loss = task.loss(model, batch)["loss"]
    loss.backward()


def measure_step(model, task, batch, opt, autocast, device, repeats: int = 5) -> dict:
    """Peak live bytes and seconds of one training step on `batch` (after a warm-up step).

    The peak is the larger of the forward + backward peak (grows with the batch) and the
    optimizer step's (a constant: parameters, gradients, moments and the update's temporaries).
    """

    def step():
        _forward_backward(model, task, batch, autocast)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state exists, kernels chosen
    weights = _tensor_bytes(model.parameters()) + _optimizer_bytes(opt)
    fb = live_peak_bytes(lambda: _forward_backward(model, task, batch, autocast), device, weights)
    grads = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    update = live_peak_bytes(opt.step, device, weights + grads)
    opt.zero_grad(set_to_none=True)
    times = []
    step()  # a second warm-up: the first timed step after profiling runs cold
    for _ in range(repeats):  # the median: a busy shared CPU makes single timings noisy
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "peak_bytes": max(fb, update),
        "activation_peak_bytes": fb,
        "update_peak_bytes": update,
        "seconds": float(statistics.median(times)),
    }


def step_flops(model, task, batch) -> int:
    """FLOPs of one forward + backward on `batch` (matmuls and convolutions, as counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        task.loss(model, batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------- the estimate


def _setup(cfg):
    """(model, task, records, autocast, device) for a config, as `mmtune train` builds them."""
    from mmtune.api import set_seed
    from mmtune.data import load_splits, screen
    from mmtune.tasks import Context, get_task

    set_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits = load_splits(cfg.data, cfg.seed)
    records, _ = screen(splits.train[:2048], "skip", cfg.data.max_image_pixels, 1.0)
    ctx = Context(cfg, splits, device)
    task = get_task(cfg.task)(ctx)
    model = task.build().to(device)
    model.train()
    return model, task, records, ctx.autocast, device


def make_batch(task, records, batch_size: int, device) -> dict:
    """A training batch of `batch_size` items (records repeated when fewer)."""
    ds = task.dataset(records, train=True)
    items = [ds[i % len(ds)] for i in range(batch_size)]
    batch = task.collate(items)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _fit(sizes, values, degree: int) -> np.ndarray:
    return np.polyfit(np.asarray(sizes, float), np.asarray(values, float), degree)


def device_memory(device: torch.device) -> int:
    """Bytes a run may use: 90% of the GPU's memory, or 80% of the RAM available now."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.9)
    import psutil

    return int(psutil.virtual_memory().available * 0.8)


def estimate(cfg, sizes: list[int] | None = None, memory_budget: int | None = None) -> dict:
    """Measure micro-steps at `sizes`, predict `data.batch_size`, suggest settings that fit."""
    target = cfg.data.batch_size
    sizes = sizes or _probe_sizes(target)
    model, task, records, autocast, device = _setup(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    from mmtune.engine import adamw

    opt = adamw(params, lr=1e-12)  # the weights barely move while measuring
    measured = []
    for b in sizes:
        m = measure_step(model, task, make_batch(task, records, b, device), opt, autocast, device)
        measured.append({"batch": b, **m})
    flops = step_flops(model, task, make_batch(task, records, sizes[0], device)) / sizes[0]
    # memory = a + b·B (activations, from the micro-steps) + q·B² (the loss's logits, measured
    # apart on random embeddings at a batch where that term is large enough to read)
    # only a loss over every pair of the batch grows as B² (a B×B logit matrix)
    q = loss_bytes_per_pair(cfg, model, records, task, device) if task.pairwise_loss else 0.0
    linear = _fit(sizes, [m["activation_peak_bytes"] - q * m["batch"] ** 2 for m in measured], 1)
    mem = np.array([q, *linear])
    update = max(m["update_peak_bytes"] for m in measured)
    sec = _fit(sizes, [m["seconds"] for m in measured], 1)
    if sec[0] <= 0:  # timings too noisy for a slope: proportional to the largest probe
        sec = np.array([measured[-1]["seconds"] / sizes[-1], 0.0])
    budget = memory_budget or device_memory(device)
    result = {
        "device": str(device),
        "batch_size": target,
        "measured": measured,
        "peak_bytes": int(max(np.polyval(mem, target), update)),
        "step_seconds": float(np.polyval(sec, target)),
        "flops_per_sample": flops,
        "memory_budget": budget,
        "fit": {"memory": mem.tolist(), "seconds": sec.tolist()},
    }
    result["samples_per_s"] = target / max(result["step_seconds"], 1e-9)
    result["suggestions"] = suggest(mem, update, target, budget, cfg)
    return result


def loss_bytes_per_pair(cfg, model, records, task, device, n: int = 1024) -> float:
    """Peak bytes of the loss and its backward on n random embeddings, per (image, text) pair."""
    from mmtune.losses import clip_loss, siglip_loss

    dim = model.encode_image(make_batch(task, records, 2, device)["pixel_values"]).shape[-1]
    img, txt = (
        torch.nn.functional.normalize(torch.randn(n, dim, device=device), dim=-1).requires_grad_() for _ in range(2)
    )
    scale = torch.tensor(10.0, device=device, requires_grad=True)

    def fn():
        if cfg.options.get("loss") == "siglip":
            siglip_loss(img, txt, scale, torch.tensor(-10.0, device=device)).backward()
        else:
            clip_loss(img, txt, scale).backward()

    return live_peak_bytes(fn, device, 0) / n**2


def _probe_sizes(target: int) -> list[int]:
    top = max(4, min(target, 256) // 2)
    return sorted({max(2, top // 4), max(3, top // 2), top})


def _largest(fits, hi: int) -> int:
    """Largest n in [1, hi] with fits(n) (fits is monotone), 0 when none."""
    lo, best = 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def suggest(mem_fit, update: int, target: int, budget: int, cfg) -> list[str]:
    """Settings that fit the budget, from the fitted peak-memory curve."""
    peak = lambda b: max(float(np.polyval(mem_fit, b)), update)  # noqa: E731
    quad = float(mem_fit[0]) if len(mem_fit) == 3 else 0.0
    if peak(target) <= budget:
        return [f"data.batch_size={target} fits ({_gb(peak(target))} of {_gb(budget)})"]
    out = []
    best = _largest(lambda b: peak(b) <= budget, target)
    if best:
        accum = math.ceil(target / best)
        out.append(
            f"data.batch_size={best} fits; with train.grad_accum={accum} the step sees "
            f"{best * accum} samples (but each loss only {best} in-batch negatives)"
        )
    # GradCache: activations of one chunk, and the loss in (chunk, B) blocks of logits
    gradcache = lambda c: peak(c) + quad * (c * target - c**2)  # noqa: E731
    chunk = _largest(lambda c: gradcache(c) <= budget, target)
    if chunk:
        out.append(
            f"options.gradcache_chunk={chunk} keeps data.batch_size={target} exactly (about {_gb(gradcache(chunk))})"
        )
    if not cfg.model.grad_checkpointing:
        out.append("model.grad_checkpointing=true recomputes activations: less memory, ~30% slower")
    if cfg.train.precision == "fp32":
        out.append("train.precision=bf16 halves activation memory on recent CPUs and GPUs")
    return out


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def format_estimate(r: dict) -> str:
    """The estimate as a few readable lines."""
    lines = [f"device: {r['device']}   memory budget: {_gb(r['memory_budget'])}"]
    for m in r["measured"]:
        lines.append(
            f"  measured batch {m['batch']:>5}: peak {_gb(m['peak_bytes']):>10}   step {m['seconds'] * 1000:8.1f} ms"
        )
    lines.append(
        f"predicted batch {r['batch_size']}: peak {_gb(r['peak_bytes'])}, step "
        f"{r['step_seconds'] * 1000:.1f} ms ({r['samples_per_s']:.0f} samples/s), "
        f"{r['flops_per_sample'] / 1e9:.3f} GFLOP/sample"
    )
    lines += ["suggestions:"] + [f"  - {s}" for s in r["suggestions"]]
    return "\n".join(lines)
