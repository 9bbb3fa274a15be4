"""Models: load CLIP-family checkpoints, compose towers, presets, freezing — one vocabulary."""

from __future__ import annotations

from pathlib import Path

from mmtune.errors import CheckpointError
from mmtune.models.dual import DualEncoder, HFDualEncoder, tower_blocks
from mmtune.models.freeze import apply_freezing, count_parameters, freeze_patterns, freeze_tower
from mmtune.models.load import (
    PRESETS,
    Processor,
    build_from_spec,
    load_weights,
    save_spec,
)

__all__ = [
    "PRESETS",
    "DualEncoder",
    "HFDualEncoder",
    "Processor",
    "apply_freezing",
    "build_from_spec",
    "count_parameters",
    "freeze_patterns",
    "freeze_tower",
    "load_model",
    "load_weights",
    "save_spec",
    "tower_blocks",
]


def _refuse_remote_code(name: str, trust_remote_code: bool) -> None:
    """A checkpoint that ships its own modelling code runs only with explicit consent."""
    from transformers import PretrainedConfig

    try:
        cfg, _ = PretrainedConfig.get_config_dict(name)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load model '{name}': {str(e).splitlines()[0]}") from None
    if "auto_map" in cfg and not trust_remote_code:
        raise CheckpointError(
            f"'{name}' ships its own modelling code (auto_map); set model.trust_remote_code: true to run it"
        )


def _from_hf(name: str, trust_remote_code: bool):
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    from mmtune.models.load import Processor, require_tokenizer_files

    _refuse_remote_code(name, trust_remote_code)
    try:
        # safetensors only: a pickled .bin could run code while loading
        hf = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code, use_safetensors=True)
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0]
        if "trust_remote_code" in str(e):
            msg = "the checkpoint ships its own code; set model.trust_remote_code: true to run it"
        raise CheckpointError(f"cannot load model '{name}': {msg}") from None
    if not (hasattr(hf, "get_image_features") and hasattr(hf, "get_text_features")):
        raise CheckpointError(
            f"'{name}' ({hf.__class__.__name__}) is not a dual encoder: compose one with "
            "model.vision=<vision checkpoint> model.text=<text checkpoint>"
        )
    require_tokenizer_files(name)
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    size, mean, std = 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    try:
        ip = AutoProcessor.from_pretrained(name).image_processor
        crop = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {}
        size = crop.get("height") or crop.get("shortest_edge") or size
        mean, std = tuple(ip.image_mean), tuple(ip.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        size = getattr(hf.config.vision_config, "image_size", size)
    siglip = "siglip" in hf.config.model_type
    max_len = getattr(hf.config.text_config, "max_position_embeddings", 77)
    proc = Processor(tok, int(size), mean, std, int(max_len), "max_length" if siglip else "longest")
    return HFDualEncoder(hf), proc, {"lock_text": False}


def _compose(model_cfg):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from mmtune.models.load import Processor, tower_kwargs

    towers = {}
    for name in ("vision", "text"):
        src = getattr(model_cfg, name)
        _refuse_remote_code(src, model_cfg.trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(src, trust_remote_code=model_cfg.trust_remote_code)
            towers[name] = AutoModel.from_pretrained(
                src,
                trust_remote_code=model_cfg.trust_remote_code,
                use_safetensors=True,
                **tower_kwargs(config),
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load model.{name} '{src}': {str(e).splitlines()[0]}") from None
    v, t = towers["vision"], towers["text"]
    vcfg = getattr(v.config, "vision_config", v.config)
    model = DualEncoder(v, t, vcfg.hidden_size, t.config.hidden_size, model_cfg.embed_dim)
    tok = AutoTokenizer.from_pretrained(model_cfg.text)
    proc = Processor(tok, int(vcfg.image_size), max_length=min(tok.model_max_length, 128))
    return model, proc, {"lock_text": False}


def _fusion_presets() -> dict:
    from mmtune.models.fusion import FUSION_PRESETS

    return FUSION_PRESETS


def load_model(model_cfg):
    """(model, processor) for `model.name` (preset / checkpoint / open_clip folder / run folder)."""
    from mmtune.models import load as L

    L.refuse_shape_fields(model_cfg)
    if model_cfg.vision is not None:
        model, proc, defaults = _compose(model_cfg)
    elif model_cfg.name in L.PRESETS:
        model, proc, defaults = L.build_preset(model_cfg)
    elif model_cfg.name in _fusion_presets():
        model, proc, defaults = _fusion_presets()[model_cfg.name]()
    elif (Path(model_cfg.name) / "open_clip_config.json").is_file() and not (
        Path(model_cfg.name) / "config.json"
    ).is_file():  # an open_clip folder (one that also holds transformers files loads as those)
        from mmtune.models.openclip import open_clip_model

        model, proc, defaults = open_clip_model(model_cfg.name)
    elif Path(model_cfg.name).exists() and not (Path(model_cfg.name) / "config.json").is_file():
        from mmtune.runs import load_run, read_spec, resolve_checkpoint

        model, proc = load_run(model_cfg.name)  # the run's task rebuilds its model
        spec_dir, _ = resolve_checkpoint(model_cfg.name)
        defaults = {"lock_text": bool(read_spec(spec_dir).get("lock_text"))}
    else:
        model, proc, defaults = _from_hf(model_cfg.name, model_cfg.trust_remote_code)
    apply_freezing(model, model_cfg, defaults)
    if model_cfg.grad_checkpointing:
        for name in ("vision", "text"):
            tower = model.tower(name)
            if hasattr(tower, "gradient_checkpointing_enable"):
                tower.gradient_checkpointing_enable()
    if model_cfg.patch_dropout:  # training only: the towers see every patch in eval mode
        model.set_patch_dropout(model_cfg.patch_dropout)
    return model, proc
