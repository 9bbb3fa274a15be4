"""Export a trained model: a transformers folder (`hf`), ONNX encoders (`onnx`) or `open-clip`.

LoRA adapters (peft layers) are merged into the base weights first. Each export folder gets a
model card (README.md) with the training config and metrics, and the largest difference between
the exported model's embeddings and PyTorch's, measured at export time on a probe batch.

A composed dual encoder (e.g. `lit-minilm`: ViT [CLS] + BERT mean pooling + linear projections)
has no single transformers class: `VisionTextDualEncoderModel` pools BERT with its pooler
(dense + tanh on [CLS]), not the mean. Its `hf` export is therefore two standard folders,
`vision/` and `text/`, each loaded by `AutoModel.from_pretrained`, plus `projection.safetensors`
and the pooling recipe in the card — no custom code. Its ONNX export is self-contained.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmtune.errors import UserError
from mmtune.models.dual import DualEncoder, HFDualEncoder

log = logging.getLogger("mmtune.export")

PROBE_TEXTS = ["a photo of the digit 3", "zero", "a handwritten seven on a white page", "x"]


def merge_adapters(model: nn.Module) -> int:
    """Merge peft adapter layers (LoRA…) into their base layers in place; the number merged."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return 0
    from mmtune.models.lora import merge_lora

    merged = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
    if merged:
        merge_lora(model)
    return merged


def _probe(processor, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    s = processor.image_size
    pixels = torch.randn(3, 3, s, s, generator=g)  # (3, 3, S, S)
    return pixels, processor.tokenize(PROBE_TEXTS)


class ImageEncoder(nn.Module):
    """pixel_values (B, 3, S, S) → normalised embeddings (B, D)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.encode_image(pixel_values)


class TextEncoder(nn.Module):
    """input_ids, attention_mask (B, L) → normalised embeddings (B, D)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.encode_text(input_ids, attention_mask)


def plain_copy(model):
    """A copy without the locked-text cache (a Python dict cannot be exported) and adapters merged."""
    model = copy.deepcopy(model).eval()
    model.text_locked = False
    n = merge_adapters(model)
    if n:
        log.info("merged %d adapter layers", n)
    return model, n


# ---------------------------------------------------------------- hf


def clip_image_processor(processor):
    """transformers' CLIPImageProcessor doing what an mmtune Processor does to an image."""
    from transformers import CLIPImageProcessor

    s = processor.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": s},
        crop_size={"height": s, "width": s},
        image_mean=list(processor.image_mean),
        image_std=list(processor.image_std),
    )


def _save_hf(model: HFDualEncoder, processor, out: Path) -> None:
    model.hf.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    clip_image_processor(processor).save_pretrained(out)


def save_whole(tower: nn.Module, folder: Path) -> list[str]:
    """Save a transformers tower so that `AutoModel.from_pretrained` finds every weight of the class
    it builds. A tower made without its pooler (mmtune pools itself: [CLS] or the mean) would load
    with a random pooler and transformers' "newly initialized" warning; the missing parts are
    written as zeros instead (the pooler's output is then 0; no recipe reads it). Returns their names."""
    from transformers import AutoModel

    with torch.device("meta"):  # names and shapes only: nothing allocated
        whole = AutoModel.from_config(tower.config)
    have = dict(tower.named_children())
    missing = [name for name, _ in whole.named_children() if name not in have]
    if missing:
        tower = copy.deepcopy(tower)
        dtype = next(tower.parameters()).dtype
        for name in missing:
            part = getattr(whole, name).to_empty(device="cpu").to(dtype)
            for t in (*part.parameters(), *part.buffers()):
                t.data.zero_()
            setattr(tower, name, part)  # the attribute may exist as None
    tower.save_pretrained(folder)
    return missing


def _save_towers(model: DualEncoder, processor, out: Path) -> None:
    from safetensors.torch import save_file

    zeroed = save_whole(model.vision, out / "vision") + save_whole(model.text, out / "text")
    if zeroed:
        log.info("written as zeros (unused by the embedding recipe): %s", ", ".join(sorted(set(zeroed))))
    processor.tokenizer.save_pretrained(out / "text")
    save_file(
        {
            "vision_projection.weight": model.vision_proj.weight.detach().contiguous(),
            "text_projection.weight": model.text_proj.weight.detach().contiguous(),
        },
        str(out / "projection.safetensors"),
    )
    pooling = {"vision": model.vision_pooling, "text": model.text_pooling}
    (out / "pooling.json").write_text(json.dumps(pooling, indent=2) + "\n")


def hf_embeddings(folder: str | Path, pixel_values, input_ids, attention_mask):
    """Embeddings of an `hf` export computed with plain transformers (the card's recipe)."""
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import AutoModel

    folder = Path(folder)
    with torch.no_grad():
        if (folder / "config.json").is_file():
            m = AutoModel.from_pretrained(folder).eval()
            img = m.get_image_features(pixel_values=pixel_values)
            txt = m.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            img = img if torch.is_tensor(img) else img.pooler_output
            txt = txt if torch.is_tensor(txt) else txt.pooler_output
            return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        proj = load_file(str(folder / "projection.safetensors"))
        vision = AutoModel.from_pretrained(folder / "vision").eval()
        text = AutoModel.from_pretrained(folder / "text").eval()
        cls = vision(pixel_values=pixel_values).last_hidden_state[:, 0]  # (B, H) [CLS]
        hidden = text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).float()  # (B, L, 1)
        mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)  # (B, H) mean over real tokens
        img = cls @ proj["vision_projection.weight"].T
        txt = mean @ proj["text_projection.weight"].T
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def is_generative(model) -> bool:
    """A transformers model that generates text (an image-text-to-text model: LLaVA, Idefics3…)."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and hasattr(model, "generate")


def generative_probe(processor) -> dict[str, torch.Tensor]:
    """Inputs of one image-and-question chat rendered by the processor's own chat template."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[Image.fromarray(pixels)], add_special_tokens=False, return_tensors="pt")
    return {k: v for k, v in enc.items() if torch.is_tensor(v) and k != "labels"}


def export_generative(model, processor, out: Path) -> float:
    """Save the model and its processor (chat template included) as one transformers folder;
    the max abs difference of the reloaded model's logits on a probe chat."""
    from transformers import AutoModelForImageTextToText

    model.save_pretrained(out)
    processor.save_pretrained(out)
    probe = generative_probe(processor)
    plain = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        return float((model(**probe).logits - plain(**probe).logits).abs().max())


def export_hf(model, processor, out: Path) -> float:
    """Write the `hf` folder; the max abs difference of its embeddings (or logits) to the model's."""
    if is_generative(model):
        return export_generative(model, processor, out)
    if isinstance(model, HFDualEncoder):
        _save_hf(model, processor, out)
    elif isinstance(model, DualEncoder):
        if (model.vision_pooling, model.text_pooling) != ("cls", "mean"):
            raise UserError(
                f"--format hf supports composed models with cls/mean pooling, not "
                f"{model.vision_pooling}/{model.text_pooling}; use --format onnx"
            )
        _save_towers(model, processor, out)
    else:
        raise UserError(f"cannot export {model.__class__.__name__} to transformers")
    px, tok = _probe(processor)
    with torch.no_grad():
        want = (model.encode_image(px), model.encode_text(**tok))
    got = hf_embeddings(out, px, tok["input_ids"], tok["attention_mask"])
    return max(float((a - b).abs().max()) for a, b in zip(want, got, strict=True))


# ---------------------------------------------------------------- onnx


def _onnx_export(module, args, path: Path, names: list[str], axes: dict) -> None:
    import warnings

    module.eval()  # the exporter restores the wrapper's mode afterwards: it must be eval too
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes={**axes, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def onnx_embeddings(folder: str | Path, pixel_values: np.ndarray, input_ids, attention_mask):
    """(image (B, D), text (B, D)) from the ONNX encoders with ONNX Runtime on CPU."""
    import onnxruntime as ort

    folder = Path(folder)
    opts = ["CPUExecutionProvider"]
    img = ort.InferenceSession(str(folder / "image_encoder.onnx"), providers=opts)
    txt = ort.InferenceSession(str(folder / "text_encoder.onnx"), providers=opts)
    a = img.run(None, {"pixel_values": np.asarray(pixel_values, np.float32)})[0]
    b = txt.run(
        None,
        {
            "input_ids": np.asarray(input_ids, np.int64),
            "attention_mask": np.asarray(attention_mask, np.int64),
        },
    )[0]
    return a, b


def export_onnx(model, processor, out: Path) -> float:
    """Write image_encoder.onnx, text_encoder.onnx, tokenizer and preprocessing; the max diff."""
    if hasattr(model, "hf"):
        model.hf.set_attn_implementation("eager")  # plain matmuls trace to standard ONNX ops
    px, tok = _probe(processor)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    _onnx_export(
        ImageEncoder(model),
        (px,),
        out / "image_encoder.onnx",
        ["pixel_values"],
        {"pixel_values": {0: "batch"}},
    )
    seq = {0: "batch", 1: "sequence"}
    _onnx_export(
        TextEncoder(model),
        (ids, mask),
        out / "text_encoder.onnx",
        ["input_ids", "attention_mask"],
        {"input_ids": seq, "attention_mask": seq},
    )
    processor.tokenizer.save_pretrained(out / "tokenizer")
    pre = {
        "image_size": processor.image_size,
        "image_mean": list(processor.image_mean),
        "image_std": list(processor.image_std),
        "resize": "shorter side to image_size (bicubic), centre crop, scale to [0,1], normalise",
        "max_length": processor.max_length,
    }
    (out / "preprocess.json").write_text(json.dumps(pre, indent=2) + "\n")
    # a different batch and length than the traced one: the dynamic axes must really be dynamic
    px2 = torch.randn(5, 3, processor.image_size, processor.image_size)
    tok2 = processor.tokenize(PROBE_TEXTS[:2] + ["a much longer caption " * 3] * 3)
    with torch.no_grad():
        want = (model.encode_image(px2).numpy(), model.encode_text(**tok2).numpy())
    got = onnx_embeddings(out, px2.numpy(), tok2["input_ids"], tok2["attention_mask"])
    return max(float(np.abs(a - b).max()) for a, b in zip(want, got, strict=True))


# ---------------------------------------------------------------- the run → folder

GENERATIVE_USAGE = """```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(FOLDER)
processor = AutoProcessor.from_pretrained(FOLDER)
chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
inputs = processor(text=[text], images=[image], add_special_tokens=False, return_tensors="pt")
answer = model.generate(**inputs, max_new_tokens=32, do_sample=False)[0, inputs["input_ids"].shape[1]:]
print(processor.tokenizer.decode(answer, skip_special_tokens=True))
```"""


def _card(run: Path, fmt: str, model, max_diff: float, merged: int) -> str:
    from mmtune.runs import resolve_checkpoint

    spec_dir, ckpt = resolve_checkpoint(run)
    cfg_file = run / "config.yaml"
    config = cfg_file.read_text() if cfg_file.is_file() else "(no config.yaml in the run folder)\n"
    metrics_file = run / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items()) or "| (none) | |"
    usage = {
        ("hf", True): (
            "```python\nfrom transformers import AutoModel\n"
            "model = AutoModel.from_pretrained(FOLDER)\n"
            "img = model.get_image_features(pixel_values=...)  # then L2-normalise\n"
            "txt = model.get_text_features(input_ids=..., attention_mask=...)\n```"
        ),
        ("hf", False): (
            "Two standard transformers folders and the projections (no custom code):\n\n"
            "```python\nfrom mmtune.export import hf_embeddings  # or inline these 10 lines:\n"
            "# vision = AutoModel.from_pretrained(FOLDER/'vision'); text = AutoModel.from_pretrained(FOLDER/'text')\n"
            "# img = normalize(vision(pixel_values).last_hidden_state[:, 0] @ Wv.T)\n"
            "# txt = normalize(mean over attention_mask of text(...).last_hidden_state @ Wt.T)\n"
            "# Wv, Wt = projection.safetensors['vision_projection.weight'], ['text_projection.weight']\n```\n\n"
            "The towers are pooled as above, not by their `pooler`: the towers were trained without "
            "one, so the folders hold the pooler's weights as zeros (`pooler_output` is 0) — loading "
            "finds every weight and initialises nothing at random."
        ),
    }
    onnx_use = (
        "```python\nimport onnxruntime as ort\n"
        "img = ort.InferenceSession('image_encoder.onnx').run(None, {'pixel_values': px})[0]\n"
        "txt = ort.InferenceSession('text_encoder.onnx').run(None, {'input_ids': ids, "
        "'attention_mask': mask})[0]\n```\nPreprocessing: `preprocess.json`; tokenizer: `tokenizer/`."
    )
    use = onnx_use if fmt == "onnx" else usage[("hf", isinstance(model, HFDualEncoder))]
    what = "Embeddings are L2-normalised; image–text similarity is their inner product."
    measured = "embeddings on a probe batch"
    if fmt == "open-clip":
        from mmtune.models.openclip import CARD_USAGE as use
    if is_generative(model):
        use, what, measured = (
            GENERATIVE_USAGE,
            "The chat template used in training is saved with the processor.",
            "logits",
        )
    return f"""# mmtune export ({fmt})

Exported from `{ckpt}` ({model.__class__.__name__}); {merged} adapter layers merged.
{what}
Largest difference to the PyTorch model's {measured}: **{max_diff:.2e}**.

## Use

{use}

## Metrics

| metric | value |
|---|---|
{rows}

## Training config

```yaml
{config}```
"""


def export_run(run: str | Path, out: str | Path, fmt: str = "hf", tolerance: float = 1e-4) -> dict:
    """Export a run / checkpoint folder to `out` as `hf` or `onnx`; returns what was measured."""
    from mmtune.runs import open_run

    run = Path(run)
    task, model = open_run(run)
    if fmt not in task.exports:
        offered = ", ".join(task.exports) or "none"
        raise UserError(f"{run} is a {task.name} run, which exports as: {offered} (not {fmt})")
    processor = task.processor
    model, merged = plain_copy(model)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: pick a new folder")
    out.mkdir(parents=True, exist_ok=True)
    from mmtune.models.openclip import export_open_clip

    export = {"hf": export_hf, "onnx": export_onnx, "open-clip": export_open_clip}[fmt]
    max_diff = export(model, processor, out)
    if max_diff > tolerance:
        raise UserError(f"the export differs from the model by {max_diff:.2e} > {tolerance}")
    run_dir = run if (run / "model").is_dir() else run.parent.parent
    (out / "README.md").write_text(_card(run_dir, fmt, model, max_diff, merged))
    return {"format": fmt, "folder": str(out), "max_abs_diff": max_diff, "merged": merged}
