"""Stable Diffusion models for the sd-lora task: the base pipeline (a local diffusers folder or the
`tiny-sd` preset), LoRA on the UNet's attention, and the run folder's spec (base + adapters).

`model.name` is a local diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
`scheduler/`; safetensors weights, read with `local_files_only`) or the preset `tiny-sd` (a small
UNet, VAE and CLIP text encoder built from configs with seeded random weights, for tests and
demos). A run folder holds the adapters only: `model/mmtune_model.json` names the base pipeline
and the adapted layers, `checkpoints/*/model.safetensors` the LoRA tensors; `load_sd_run`
rebuilds the model. The task is `mmtune.tasks.sd_lora`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from mmtune.errors import CheckpointError, ConfigError

PRESET = "tiny-sd"
SPEC_KIND = "sd-lora"
COMPONENTS = {
    # sub-folder: (config file, weights file or None)
    "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("config.json", "model.safetensors"),
    "tokenizer": ("tokenizer_config.json", None),
    "scheduler": ("scheduler_config.json", None),
}
DEFAULT_TARGETS = ["*.to_q", "*.to_k", "*.to_v", "*.to_out.0"]
_TINY_SEED = 0  # the preset's random weights: the same on every rebuild


class SDLoRAModel(nn.Module):
    """UNet (with LoRA) + frozen VAE and text encoder; its state dict holds the adapters only."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict, base: str):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler_config, self.base = tokenizer, dict(scheduler_config), base
        self.lora_layers: list[str] = []
        self._scheduler = None
        for m in (vae, text_encoder):
            m.requires_grad_(False)
            m.eval()

    # the frozen parts never train (no dropout / batch statistics)
    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def noise_scheduler(self):
        """The training noise schedule (DDPM) of the base pipeline's scheduler config."""
        if self._scheduler is None:
            from diffusers import DDPMScheduler

            self._scheduler = DDPMScheduler.from_config(self.scheduler_config)
        return self._scheduler

    def forward(self, noisy_latents, timesteps, encoder_hidden_states):
        """The UNet's prediction (noise or velocity) for noisy latents at `timesteps`."""
        return self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids padded to the tokenizer's length → the UNet's conditioning (as the pipeline
        encodes prompts: last hidden state, no attention mask)."""
        return self.text_encoder(input_ids.to(self.unet.device))[0]

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator=None) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] → latents sampled from the VAE, times its scaling factor."""
        px = pixel_values.to(self.unet.device, self.vae.dtype)
        dist = self.vae.encode(px).latent_dist
        return dist.sample(generator=generator) * self.vae.config.scaling_factor

    # adapters only: the base is named by `base` and rebuilt from it
    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if ".lora_" in k)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = set(self.state_dict())
        missing = sorted(own - set(state_dict))
        unexpected = sorted(set(state_dict) - own)
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"LoRA weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        kept = {k: v for k, v in state_dict.items() if k in own}
        super().load_state_dict(kept, strict=False, assign=assign)
        return _IncompatibleKeys(missing, unexpected)


def add_unet_lora(
    model: SDLoRAModel,
    rank: int,
    alpha: float,
    dropout: float,
    targets: list[str] | None = None,
    names: list[str] | None = None,
) -> list[str]:
    """Inject LoRA into the UNet's linear layers matching `targets` (or exactly `names`)."""
    from peft import LoraConfig, inject_adapter_in_model

    from mmtune.models.lora import linear_names

    if names is None:
        names = linear_names(model.unet, model.unet, targets)
        if not names:
            raise ConfigError(
                f"options.targets {targets} match no linear layer of the UNet; attention "
                "projections are named like "
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
            )
    model.requires_grad_(False)
    pattern = "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
    inject_adapter_in_model(config, model.unet)
    model.lora_layers = list(names)
    return names


# ---------------------------------------------------------------- building the base


def _tiny_components():
    """The `tiny-sd` preset: small UNet/VAE/CLIP text encoder with seeded random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from mmtune.models.load import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())  # a real word-piece vocab, offline
    tok.model_max_length = 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=tok.vocab_size,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=tok.model_max_length,
                bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id,
            )
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
        )
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            norm_num_groups=8,
            cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4,
        )
    scheduler = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    return unet, vae, text, tok, scheduler


def _read_json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e.__class__.__name__})") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return out


def check_pipeline_folder(folder: str | Path) -> Path:
    """The folder if it holds every part of a diffusers SD pipeline; CheckpointError otherwise.

    Weights must be safetensors (a pickled .bin could run code while loading), and a part that
    ships its own code (`auto_map`, or a class from outside diffusers/transformers) is refused.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model.name '{folder}': not a diffusers pipeline folder nor the preset '{PRESET}'")
    missing = []
    for sub, (config, weights) in COMPONENTS.items():
        if not (folder / sub).is_dir():
            missing.append(f"{sub}/")
            continue
        for name in (config, weights):
            if name and not (folder / sub / name).is_file():
                missing.append(f"{sub}/{name}")
    if missing:
        pickles = [p.relative_to(folder) for p in folder.glob("*/*.bin")]
        hint = f" (found pickled {[str(p) for p in pickles]}: convert to safetensors)" if pickles else ""
        raise CheckpointError(f"'{folder}' is not a complete diffusers pipeline: missing {', '.join(missing)}{hint}")
    index = folder / "model_index.json"
    if index.is_file():
        for key, value in _read_json(index).items():
            if (
                key in COMPONENTS
                and isinstance(value, list)
                and value
                and value[0]
                not in (
                    "diffusers",
                    "transformers",
                    None,
                )
            ):
                raise CheckpointError(
                    f"'{folder}': {key} comes from '{value[0]}', code outside diffusers and "
                    "transformers; refusing to run it"
                )
    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        config = _read_json(folder / sub / COMPONENTS[sub][0])
        if "auto_map" in config:
            raise CheckpointError(f"'{folder / sub}' ships its own modelling code (auto_map); refusing to run it")
    return folder


def _folder_components(folder: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    check_pipeline_folder(folder)
    kw = {"local_files_only": True, "use_safetensors": True}
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
        text = CLIPTextModel.from_pretrained(folder / "text_encoder", **kw)
        tok = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load pipeline '{folder}': {str(e).splitlines()[0]}") from None
    scheduler = {
        k: v for k, v in _read_json(folder / "scheduler" / "scheduler_config.json").items() if not k.startswith("_")
    }
    return unet, vae, text, tok, scheduler


def base_files(base: str) -> dict[str, int]:
    """Byte sizes of a base folder's weight files (a cheap check that it is still the same)."""
    if base == PRESET:
        return {}
    return {
        f"{sub}/{weights}": (Path(base) / sub / weights).stat().st_size
        for sub, (_, weights) in COMPONENTS.items()
        if weights and (Path(base) / sub / weights).is_file()
    }


def load_base(name: str) -> SDLoRAModel:
    """The base pipeline (no adapters): the preset or a local diffusers folder."""
    if name == PRESET:
        parts, base = _tiny_components(), PRESET
    else:
        folder = Path(name).expanduser().resolve()
        parts, base = _folder_components(folder), str(folder)
    unet, vae, text, tok, scheduler = parts
    # prompts are padded to the tokenizer's length: no longer than the text encoder's positions
    tok.model_max_length = min(tok.model_max_length, text.config.max_position_embeddings)
    model = SDLoRAModel(unet, vae, text, tok, scheduler, base)
    model.requires_grad_(False)
    return model


def processor_for(model: SDLoRAModel, resolution: int):
    from mmtune.models.load import Processor

    unet_down = 2 ** (len(model.unet.config.block_out_channels) - 1)
    factor = model.vae_scale_factor * unet_down
    if resolution % 8 or resolution % factor:
        raise ConfigError(
            f"options.resolution={resolution}: must be a multiple of 8 and of the VAE × UNet "
            f"down-sampling factor {factor}"
        )
    tok = model.tokenizer
    return Processor(tok, resolution, max_length=tok.model_max_length, padding="max_length")


def save_sd_spec(model: SDLoRAModel, opts, resolution: int, folder: Path) -> None:
    """What rebuilds the run's model: the base reference, the adapted layers (`opts`: rank,
    alpha, dropout of the task options), the resolution."""
    from mmtune.runs import SPEC_FILE

    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "kind": SPEC_KIND,
        "base": model.base,
        "base_files": base_files(model.base),
        "resolution": resolution,
        "lora": {
            "rank": opts.rank,
            "alpha": opts.alpha,
            "dropout": opts.dropout,
            "layers": model.lora_layers,
        },
    }
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))


def load_sd_run(path: str | Path):
    """(model with its trained LoRA, processor) from a sd-lora run folder or checkpoint folder."""
    from mmtune.models.load import load_weights
    from mmtune.runs import resolve_checkpoint

    spec_dir, ckpt = resolve_checkpoint(path)
    model, processor = rebuild_sd(spec_dir)
    load_weights(model, ckpt / "model.safetensors")
    return model.eval(), processor


def rebuild_sd(spec_dir: Path):
    """(base model with the run's adapters, processor) of a sd-lora model folder; the adapters'
    weights are not loaded."""
    from mmtune.runs import read_spec

    spec = read_spec(spec_dir)
    path = spec_dir
    if spec.get("kind") != SPEC_KIND:
        raise CheckpointError(f"{path}: not a sd-lora run")
    recorded = spec.get("base_files") or {}
    if recorded and Path(spec["base"]).is_dir() and recorded != base_files(spec["base"]):
        raise CheckpointError(
            f"{path}: the base pipeline {spec['base']} changed since training (weight files "
            "differ); the adapters were trained for the old one"
        )
    model = load_base(spec["base"])
    lora = spec["lora"]
    add_unet_lora(model, lora["rank"], lora["alpha"], lora["dropout"], names=lora["layers"])
    return model, processor_for(model, int(spec["resolution"]))
