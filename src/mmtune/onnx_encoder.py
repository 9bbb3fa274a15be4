"""A dual encoder that runs on ONNX Runtime: `mmtune serve|embed --backend onnx [--quantize int8]`.

The run's model is exported with `mmtune.export` (the same encoders `mmtune export --format onnx`
writes, checked against PyTorch at export time), optionally quantised to int8 weights
(onnxruntime's dynamic quantisation: int8 matmul weights, activations quantised per batch), and
loaded into ONNX Runtime sessions. `OnnxDualEncoder` speaks the model vocabulary
(`encode_image`, `encode_text`, `scale`), so the server's batchers and `embed_items` use it as
they use the PyTorch model.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmtune.errors import UserError

log = logging.getLogger("mmtune.onnx")

BACKENDS = ("torch", "onnx")
QUANTIZE = ("none", "int8")
EXPORT_TOLERANCE = 1e-4


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # ORT's pool spins between ops like libgomp does; on a shared CPU that burns the cores
    # other processes (and the server's event loop) need — see mmtune.threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic 8-bit quantisation of an ONNX model: uint8 weights, activations per batch.

    uint8 rather than int8 weights: without VNNI (AVX2-only CPUs) onnxruntime's u8×s8 kernel
    sums pairs in saturating int16 and loses accuracy; u8×u8 does not. On the demo model
    (docs/benchmarks.md) int8 weights cost 0.04 of text→image R@1, uint8 weights nothing.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice is about static quantisation
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)


@contextmanager
def _quiet_stdout_fd():
    """Silence file descriptor 1: on failure the exporter's C++ side dumps its whole graph there."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def export_encoders(model, processor, folder: Path) -> float:
    """Write image_encoder.onnx / text_encoder.onnx for `model`; max abs diff to PyTorch."""
    from mmtune.export import export_onnx, plain_copy

    name = model.__class__.__name__
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise UserError(f"--backend onnx: {name} is not a dual encoder; use --backend torch")
    plain, _ = plain_copy(model)
    try:
        with _quiet_stdout_fd():
            diff = export_onnx(plain, processor, folder)
    except Exception as e:  # the exporter's errors are long; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--backend onnx: {name} cannot be exported ({first[:200]}); use --backend torch") from None
    if diff > EXPORT_TOLERANCE:
        raise UserError(
            f"--backend onnx: the export of {name} differs from PyTorch by "
            f"{diff:.2e} > {EXPORT_TOLERANCE}; use --backend torch"
        )
    return diff


def _normalised_only(normalize: bool) -> None:
    if not normalize:
        raise ValueError("the ONNX encoders return normalised embeddings only")


class OnnxDualEncoder(nn.Module):
    """encode_image / encode_text on ONNX Runtime sessions; logit scale copied from the model."""

    def __init__(self, image_session, text_session, logit_scale: torch.Tensor, quantize="none"):
        super().__init__()
        self.image_session, self.text_session = image_session, text_session
        self.logit_scale = nn.Parameter(logit_scale.detach().clone(), requires_grad=False)
        self.quantize = quantize

    @classmethod
    def from_model(cls, model, processor, quantize: str = "none", threads: int | None = None):
        """Export `model` (a dual encoder) to ONNX, quantise if asked, open the sessions."""
        if quantize not in QUANTIZE:
            raise UserError(f"unknown --quantize {quantize!r}: use one of {', '.join(QUANTIZE)}")
        threads = threads or torch.get_num_threads()
        with tempfile.TemporaryDirectory(prefix="mmtune-onnx-") as tmp:
            folder = Path(tmp)
            diff = export_encoders(model, processor, folder)
            log.info("ONNX export: max abs difference to PyTorch %.2e", diff)
            sessions = []
            for part in ("image_encoder", "text_encoder"):
                path = folder / f"{part}.onnx"
                if quantize == "int8":
                    quantize_int8(path, folder / f"{part}.int8.onnx")
                    path = folder / f"{part}.int8.onnx"
                sessions.append(_session(path, threads))
        return cls(*sessions, model.logit_scale, quantize)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 as in CLIP."""
        return self.logit_scale.exp().clamp(max=100.0)

    def encode_image(self, pixel_values, normalize: bool = True) -> torch.Tensor:
        """(B, 3, S, S) → (B, D) L2-normalised (the exported encoder normalises)."""
        _normalised_only(normalize)
        px = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
        return torch.from_numpy(self.image_session.run(None, {"pixel_values": px})[0])

    def encode_text(self, input_ids, attention_mask, normalize: bool = True) -> torch.Tensor:
        """(B, L) ids and mask → (B, D) L2-normalised."""
        _normalised_only(normalize)
        feeds = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
        }
        return torch.from_numpy(self.text_session.run(None, feeds)[0])


def maybe_onnx(model, processor, backend: str = "torch", quantize: str = "none"):
    """`model` itself for the torch backend, or its `OnnxDualEncoder`."""
    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        if quantize != "none":
            raise UserError("--quantize int8 needs --backend onnx")
        return model
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("--backend onnx needs onnxruntime: pip install 'mmtune[export]'") from None
    return OnnxDualEncoder.from_model(model, processor, quantize)
