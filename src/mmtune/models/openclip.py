"""open_clip checkpoints ⇄ transformers `CLIPModel`: configs, weights, tokenizer, preprocessing.

An open_clip folder holds `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}, or a bare
model config) and `open_clip_model.safetensors`. Supported: open_clip's own ViT image tower and
text transformer (QuickGELU or GELU) — the architecture `CLIPModel` defines. Every other tower
(timm, Hugging Face text, ModifiedResNet) or option that changes the computation is refused by
name. Weights map one to one, except attention, where open_clip keeps q, k and v in one
`in_proj` matrix (3D, D) that transformers splits into three (D, D) projections.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from mmtune.errors import CheckpointError

log = logging.getLogger("mmtune.models")
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
PICKLED = ("open_clip_pytorch_model.bin", "open_clip_model.bin", "pytorch_model.bin")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# options (with their neutral value) that change the computation away from CLIPModel's
_VISION_NEUTRAL = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
_TEXT_NEUTRAL = {
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "hf_tokenizer_name": None,
    "tokenizer_mode": None,
}


def is_open_clip_folder(path: str | Path) -> bool:
    """True for a folder holding an open_clip_config.json."""
    return (Path(path) / CONFIG_FILE).is_file()


def read_config(folder: str | Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) of an open_clip folder."""
    path = Path(folder) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable open_clip config ({e})") from None
    model_cfg = raw.get("model_cfg", raw)
    if not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise CheckpointError(f"{path}: no embed_dim / vision_cfg / text_cfg in the model config")
    return model_cfg, raw.get("preprocess_cfg", {})


def check_supported(model_cfg: dict, where: str) -> None:
    """Refuse, naming it, any tower or option that CLIPModel cannot compute the same way."""
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    found = None
    if v.get("timm_model_name"):
        found = f"a timm image tower ({v['timm_model_name']})"
    elif isinstance(v.get("layers"), (list, tuple)):
        found = f"a ResNet image tower (layers {v['layers']})"
    elif t.get("hf_model_name"):
        found = f"a Hugging Face text tower ({t['hf_model_name']})"
    elif "multimodal_cfg" in model_cfg:
        found = "a CoCa captioning decoder (multimodal_cfg)"
    elif model_cfg.get("init_logit_bias") is not None:
        found = "a SigLIP logit bias (init_logit_bias)"
    else:
        for tower, cfg, neutral in (("vision", v, _VISION_NEUTRAL), ("text", t, _TEXT_NEUTRAL)):
            odd = [k for k, n in neutral.items() if cfg.get(k, n) != n]
            if odd:
                found = f"{tower}_cfg.{odd[0]}={cfg[odd[0]]!r}"
                break
    if found:
        raise CheckpointError(
            f"{where}: has {found}; only open_clip's ViT image tower with its own text "
            "transformer converts to a transformers CLIPModel"
        )


def hf_config(model_cfg: dict):
    """The transformers CLIPConfig of a supported open_clip model config."""
    from transformers import CLIPConfig

    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    width, image = v.get("width", 768), v.get("image_size", 224)
    if not isinstance(image, int):  # open_clip allows (H, W); CLIPModel is square
        if image[0] != image[1]:
            raise CheckpointError(f"vision_cfg.image_size={image}: only square images convert")
        image = image[0]
    text = {
        "vocab_size": t.get("vocab_size", 49408),
        "hidden_size": t.get("width", 512),
        "intermediate_size": int(t.get("width", 512) * t.get("mlp_ratio", 4.0)),
        "num_hidden_layers": t.get("layers", 12),
        "num_attention_heads": t.get("heads", 8),
        "max_position_embeddings": t.get("context_length", 77),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    vision = {
        "hidden_size": width,
        "intermediate_size": int(width * v.get("mlp_ratio", 4.0)),
        "num_hidden_layers": v.get("layers", 12),
        "num_attention_heads": width // v.get("head_width", 64),
        "image_size": image,
        "patch_size": v.get("patch_size", 16),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=model_cfg["embed_dim"])


def open_clip_config(config) -> dict:
    """The open_clip model config of a transformers CLIPConfig (the inverse of hf_config)."""
    v, t = config.vision_config, config.text_config
    acts = {v.hidden_act, t.hidden_act}
    if acts not in ({"gelu"}, {"quick_gelu"}):
        raise CheckpointError(f"activations {sorted(acts)}: open_clip has gelu or quick_gelu")
    cfg = {
        "embed_dim": config.projection_dim,
        "vision_cfg": {
            "image_size": v.image_size,
            "layers": v.num_hidden_layers,
            "width": v.hidden_size,
            "patch_size": v.patch_size,
            "head_width": v.hidden_size // v.num_attention_heads,
            "mlp_ratio": v.intermediate_size / v.hidden_size,
        },
        "text_cfg": {
            "context_length": t.max_position_embeddings,
            "vocab_size": t.vocab_size,
            "width": t.hidden_size,
            "heads": t.num_attention_heads,
            "layers": t.num_hidden_layers,
            "mlp_ratio": t.intermediate_size / t.hidden_size,
        },
    }
    if acts == {"quick_gelu"}:
        cfg["quick_gelu"] = True
    return cfg


# ---------------------------------------------------------------- weights


def _block_pairs(src: str, dst: str) -> list[tuple[str, str]]:
    """(open_clip suffix, transformers suffix) of one residual block, attention excluded."""
    names = [
        ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
        ("attn.out_proj", "self_attn.out_proj"),
    ]
    return [(f"{src}.{a}.{p}", f"{dst}.{b}.{p}") for a, b in names for p in ("weight", "bias")]


def _tower_pairs(config) -> list[tuple[str, str]]:
    """(open_clip key, transformers key) of every weight that maps unchanged."""
    pairs = [
        ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
        ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ]
    for p in ("weight", "bias"):
        pairs += [
            (f"visual.ln_pre.{p}", f"vision_model.pre_layrnorm.{p}"),
            (f"visual.ln_post.{p}", f"vision_model.post_layernorm.{p}"),
            (f"ln_final.{p}", f"text_model.final_layer_norm.{p}"),
        ]
    for i in range(config.vision_config.num_hidden_layers):
        src, dst = f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}"
        pairs += _block_pairs(src, dst)
    for i in range(config.text_config.num_hidden_layers):
        pairs += _block_pairs(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    return pairs


def _attn_prefixes(config) -> list[tuple[str, str]]:
    v = [
        (f"visual.transformer.resblocks.{i}.attn", f"vision_model.encoder.layers.{i}.self_attn")
        for i in range(config.vision_config.num_hidden_layers)
    ]
    t = [
        (f"transformer.resblocks.{i}.attn", f"text_model.encoder.layers.{i}.self_attn")
        for i in range(config.text_config.num_hidden_layers)
    ]
    return v + t


def _take(state: dict, key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{where}: weight {key} is missing")
    return state[key]


def to_hf_state(state: dict, config, where: str) -> dict[str, torch.Tensor]:
    """open_clip state dict → CLIPModel state dict (same values; q/k/v split from in_proj)."""
    if "text.token_embedding.weight" in state:  # saved as CustomTextCLIP: text tower under text.
        state = {k.removeprefix("text."): v for k, v in state.items()}
    out = {dst: _take(state, src, where) for src, dst in _tower_pairs(config)}
    for src, dst in _attn_prefixes(config):
        w = _take(state, f"{src}.in_proj_weight", where).chunk(3)  # (3D, D) → 3 × (D, D)
        b = _take(state, f"{src}.in_proj_bias", where).chunk(3)
        for j, name in enumerate("qkv"):
            out[f"{dst}.{name}_proj.weight"], out[f"{dst}.{name}_proj.bias"] = w[j], b[j]
    out["visual_projection.weight"] = _take(state, "visual.proj", where).T  # (D, E) → (E, D)
    out["text_projection.weight"] = _take(state, "text_projection", where).T  # (D, E) → (E, D)
    out["logit_scale"] = _take(state, "logit_scale", where).reshape(())
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state(state: dict, config) -> dict[str, torch.Tensor]:
    """CLIPModel state dict → open_clip state dict (the inverse of to_hf_state)."""
    out = {src: state[dst] for src, dst in _tower_pairs(config)}
    for src, dst in _attn_prefixes(config):
        out[f"{src}.in_proj_weight"] = torch.cat([state[f"{dst}.{n}_proj.weight"] for n in "qkv"])
        out[f"{src}.in_proj_bias"] = torch.cat([state[f"{dst}.{n}_proj.bias"] for n in "qkv"])
    out["visual.proj"] = state["visual_projection.weight"].T
    out["text_projection"] = state["text_projection.weight"].T
    out["logit_scale"] = state["logit_scale"].reshape(())
    return {k: v.detach().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------- folders


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The safetensors weights of an open_clip folder; a pickled checkpoint is refused."""
    from mmtune.checkpoint import read_safetensors

    folder = Path(folder)
    for name in (WEIGHTS_FILE, "open_clip_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return read_safetensors(folder / name)
    pickled = [n for n in PICKLED if (folder / n).is_file()]
    if pickled:
        raise CheckpointError(
            f"{folder / pickled[0]}: pickled weights can run code when loaded; only "
            f"safetensors are read (save the state dict as {WEIGHTS_FILE})"
        )
    raise CheckpointError(f"{folder}: no {WEIGHTS_FILE}")


def load_tokenizer(folder: str | Path, context_length: int):
    """Tokenizer files beside the checkpoint (as on the Hub) if any, else CLIP's BPE built offline."""
    from mmtune.models.clip_bpe import clip_tokenizer

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        tok.model_max_length = context_length
        return tok
    return clip_tokenizer(context_length)


def _tokenizer(folder: str | Path, config):
    tok = load_tokenizer(folder, config.max_position_embeddings)
    if len(tok) != config.vocab_size:
        raise CheckpointError(
            f"{folder}: text_cfg.vocab_size={config.vocab_size} but the tokenizer has "
            f"{len(tok)} tokens; put the model's tokenizer files in the folder"
        )
    return tok


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def load_open_clip(folder: str | Path):
    """(CLIPModel with the folder's weights, Processor) of an open_clip folder."""
    from transformers import CLIPModel

    from mmtune.models.load import Processor

    model_cfg, pre = read_config(folder)
    check_supported(model_cfg, str(folder))
    config = hf_config(model_cfg)
    with _no_init():  # every weight is overwritten: random init of a ViT-L would take seconds
        hf = CLIPModel(config)
    state = to_hf_state(read_weights(folder), config, str(folder))
    try:
        missing, unexpected = hf.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape that contradicts the config
        msg = next((x.strip() for x in str(e).splitlines() if "size mismatch" in x), str(e))
        raise CheckpointError(f"{folder}: weights do not fit its config ({msg})") from None
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers, not weights
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit (missing {missing[:3]})")
    size = config.vision_config.image_size
    ctx = config.text_config.max_position_embeddings
    if pre.get("resize_mode", "shortest") != "shortest" or pre.get("interpolation", "bicubic") != "bicubic":
        log.warning(
            "%s: preprocess %s/%s read as shortest-side bicubic resize + centre crop",
            folder,
            pre.get("resize_mode"),
            pre.get("interpolation"),
        )
    mean = tuple(pre.get("mean", OPENAI_MEAN))
    std = tuple(pre.get("std", OPENAI_STD))
    tok = _tokenizer(folder, config.text_config)
    return hf.eval(), Processor(tok, size, mean, std, ctx, "longest")


def open_clip_model(folder: str | Path):
    """(dual encoder, processor, defaults) for `model.name` naming an open_clip folder."""
    from mmtune.models.dual import HFDualEncoder

    hf, proc = load_open_clip(folder)
    return HFDualEncoder(hf), proc, {"lock_text": False}


def save_image_processor(folder: Path, size: int, mean, std) -> None:
    """CLIPImageProcessor settings: shorter side to `size` (bicubic), centre crop, normalise."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(mean),
        image_std=list(std),
    ).save_pretrained(folder)


def convert_open_clip(src: str | Path, dst: str | Path) -> dict:
    """Write a transformers CLIPModel folder (weights, tokenizer, image processor) from open_clip."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst} exists and is not empty: pick a new folder")
    hf, proc = load_open_clip(src)
    tmp = dst.with_name(f".{dst.name}.tmp")  # a failed write never leaves a half folder at dst
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)  # safetensors
    proc.tokenizer.save_pretrained(tmp)
    save_image_processor(tmp, proc.image_size, proc.image_mean, proc.image_std)
    if dst.exists():
        dst.rmdir()  # empty, checked above
    os.replace(tmp, dst)
    return {
        "folder": str(dst),
        "parameters": sum(p.numel() for p in hf.parameters()),
        "image_size": proc.image_size,
        "context_length": proc.max_length,
    }


def is_clip_bpe(tokenizer) -> bool:
    """Whether a tokenizer gives CLIP's BPE ids (open_clip's default tokenizer)."""
    ids = tokenizer("a photo of a cat")["input_ids"]
    return len(tokenizer) == 49408 and ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def write_open_clip(hf, processor, out: Path) -> None:
    """Write a CLIPModel as an open_clip folder: config (model + preprocessing), safetensors."""
    from safetensors.torch import save_file

    if hf.__class__.__name__ != "CLIPModel":
        raise CheckpointError(f"--format open-clip needs a transformers CLIPModel, not {hf.__class__.__name__}")
    if not is_clip_bpe(processor.tokenizer):
        raise CheckpointError(
            f"open_clip would tokenize with CLIP's BPE, but this model's tokenizer is "
            f"{processor.tokenizer.__class__.__name__} ({len(processor.tokenizer)} tokens)"
        )
    pre = {
        "mean": list(processor.image_mean),
        "std": list(processor.image_std),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    cfg = {"model_cfg": open_clip_config(hf.config), "preprocess_cfg": pre}
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(from_hf_state(hf.state_dict(), hf.config), str(out / WEIGHTS_FILE))
    processor.tokenizer.save_pretrained(out)  # open_clip ignores these; Hub repos carry them


CARD_USAGE = """open_clip's folder layout (`open_clip_config.json` + `open_clip_model.safetensors`):

```python
import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:FOLDER")
tokenizer = open_clip.get_tokenizer("local-dir:FOLDER")
```"""


def export_open_clip(model, processor, out: Path) -> float:
    """Write an open_clip folder; the max abs difference of its reloaded embeddings to the model's."""
    write_open_clip(getattr(model, "hf", model), processor, out)
    back, proc = load_open_clip(out)
    g = torch.Generator().manual_seed(0)
    px = torch.randn(3, 3, processor.image_size, processor.image_size, generator=g)  # (3, 3, S, S)
    tok = processor.tokenize(["a photo of the digit 3", "zero", "x"])
    with torch.no_grad():
        want = (model.encode_image(px), model.encode_text(**tok))
        got = [
            torch.nn.functional.normalize(getattr(t, "pooler_output", t), dim=-1)  # transformers 5
            for t in (back.get_image_features(pixel_values=px), back.get_text_features(**tok))
        ]
    return max(float((a - b).abs().max()) for a, b in zip(want, got, strict=True))
