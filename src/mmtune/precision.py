"""Which autocast precision a run really uses on the device at hand.

bf16 pays off only where the hardware multiplies bf16 natively (CPUs with AVX512-BF16 or AMX,
GPUs from Ampere on). Elsewhere PyTorch falls back to a reference kernel — on an AVX2-only CPU a
bf16 matmul runs a hundred times slower than fp32 — so a bf16 request there runs in fp32, with a
warning saying why. `MMTUNE_FORCE_BF16=1` keeps bf16 regardless (for testing that path).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("mmtune")
_warned: set[str] = set()


def native_bf16(device_type: str) -> bool:
    """Whether `device_type` ("cpu", "cuda", …) multiplies bf16 matrices natively."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return True if probe is None else bool(probe())
    return True


def effective_precision(requested: str, device_type: str) -> str:
    """`requested` ("fp32" / "bf16" / "fp16"), or "fp32" for bf16 where it would crawl."""
    if requested != "bf16" or native_bf16(device_type) or os.environ.get("MMTUNE_FORCE_BF16"):
        return requested
    if device_type not in _warned:
        _warned.add(device_type)
        cap = torch.backends.cpu.get_cpu_capability() if device_type == "cpu" else device_type
        log.warning(
            "precision bf16 requested, but this %s (%s) has no native bf16 matrix unit, where "
            "bf16 runs far slower than fp32: running in fp32 (MMTUNE_FORCE_BF16=1 insists)",
            device_type.upper(),
            cap,
        )
    return "fp32"
