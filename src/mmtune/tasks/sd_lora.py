"""The sd-lora task: low-rank adapters on a diffusers UNet's attention, trained to denoise.

The model (base pipeline, `tiny-sd` preset, LoRA, run spec) lives in `mmtune.models.sd`. The VAE
and text encoder stay frozen. Loss: the standard noise-prediction MSE (DDPM schedule, uniform
random timesteps, latents scaled by the VAE's scaling factor); `v_prediction` schedulers regress
the velocity. Captions are dropped to "" with probability `options.caption_dropout`, so sampling
can use classifier-free guidance. `generate` (and `generate_images` for a run folder) samples
with a `StableDiffusionPipeline`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from mmtune.data import ImageTextDataset
from mmtune.errors import ConfigError, DataError
from mmtune.models.sd import (
    DEFAULT_TARGETS,
    SDLoRAModel,
    add_unet_lora,
    load_base,
    load_sd_run,
    processor_for,
    rebuild_sd,
    save_sd_spec,
)
from mmtune.tasks.base import Evaluation, Task


class SDLoRAOptions(BaseModel):
    """`options:` of the sd-lora task."""

    model_config = ConfigDict(extra="forbid")
    resolution: int | None = Field(
        None, gt=0, description="Training image size (square); default: the UNet's native size."
    )
    rank: int = Field(4, ge=1, description="LoRA rank r.")
    alpha: float = Field(4.0, gt=0, description="LoRA alpha (the update is scaled by alpha/r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="fnmatch patterns on the UNet's linear layer names that get adapters.",
    )
    caption_dropout: float = Field(0.1, ge=0, le=1, description="Probability a training caption is replaced by ''.")
    eval_samples: int = Field(256, ge=1, description="Held-out records scored by the denoising loss (the first N).")
    eval_seed: int = Field(1234, description="Seed of the evaluation noise and timesteps.")
    clip_checkpoint: str | None = Field(
        None, description="An mmtune dual-encoder run: also report CLIP-score of generations."
    )
    clip_prompts: int = Field(8, ge=1, description="Held-out captions generated for CLIP-score.")
    clip_steps: int = Field(20, ge=1, description="Sampling steps for the CLIP-score images.")
    guidance: float = Field(7.5, ge=0, description="Guidance scale: CLIP-score images and `mmtune generate`'s default.")
    reranker: str | None = Field(None, description="Dual-encoder run that re-ranks `mmtune generate`'s candidates.")


# ---------------------------------------------------------------- the model


# ---------------------------------------------------------------- data


class _CaptionDropDataset(ImageTextDataset):
    """Image-caption items whose caption is replaced by '' with probability `drop` (seeded)."""

    def __init__(self, records, transform, seed: int, drop: float):
        super().__init__(records, transform, seed)
        self.drop = drop

    def __getitem__(self, i: int):
        item = super().__getitem__(i)
        if item is not None and self.drop > 0:
            rng = np.random.default_rng([self.seed, self.epoch, i, 7])
            if rng.random() < self.drop:
                item["caption"] = ""
        return item


def _with_captions(records) -> list:
    kept = [r for r in records if r.captions]
    if records and not kept:
        raise DataError("task sd-lora needs image-caption pairs: no record has a caption")
    return kept


# ---------------------------------------------------------------- the task


class SDLoRATask(Task):
    """Fine-tune a text-to-image diffusion model with LoRA; generate with `generate`."""

    name = "sd-lora"
    Options = SDLoRAOptions
    metric, higher_is_better = "sd.denoise_loss", False
    routes = ("predict",)

    def build(self):
        """The base pipeline of `model.name` with fresh adapters on its UNet."""
        model = load_base(self.cfg.model.name)
        o = self.opts
        add_unet_lora(model, o.rank, o.alpha, o.dropout, o.targets)
        self.processor = processor_for(model, o.resolution or model.native_resolution)
        return model

    def save(self, model, folder: Path) -> None:
        save_sd_spec(model, self.opts, self.processor.image_size, folder)

    def load(self, folder: Path):
        model, self.processor = rebuild_sd(folder)
        return model

    def dataset(self, records, train: bool):
        tf = self.processor.transform(augment=bool(train and self.cfg.data.augment))
        drop = self.opts.caption_dropout if train else 0.0
        return _CaptionDropDataset(_with_captions(records), tf, self.cfg.seed, drop)

    def collate(self, items):
        items = [it for it in items if it is not None]
        if not items:
            return {}
        tok = self.processor.tokenizer
        ids = tok(
            [it["caption"] for it in items],
            padding="max_length",
            truncation=True,
            max_length=tok.model_max_length,
            return_tensors="pt",
        )["input_ids"]
        return {
            "pixel_values": torch.from_numpy(np.stack([it["pixel_values"] for it in items])),
            "input_ids": ids,
        }

    def loss(self, model, batch, generator=None, timesteps=None) -> dict[str, torch.Tensor]:
        """Noise-prediction MSE; `generator`/`timesteps` fix the noise for evaluation."""
        m = model
        sched = m.noise_scheduler()
        latents = m.encode_images(batch["pixel_values"], generator).float()
        cond = m.encode_text(batch["input_ids"])
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        if timesteps is None:
            n = sched.config.num_train_timesteps
            timesteps = torch.randint(0, n, (b,), generator=generator, device=latents.device)
        timesteps = timesteps.to(latents.device).long()
        noisy = sched.add_noise(latents, noise, timesteps)
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = model(noisy, timesteps, cond.to(noisy.dtype))
        return {"loss": F.mse_loss(pred.float(), target.float()), "samples": b}

    @torch.no_grad()
    def denoise_loss(self, model, records) -> float:
        """Mean noise-prediction loss over records with fixed noise and evenly spread timesteps."""
        from torch.utils.data import DataLoader

        m = model
        ds = self.dataset(records[: self.opts.eval_samples], train=False)
        loader = DataLoader(ds, batch_size=self.cfg.data.eval_batch_size, num_workers=0, collate_fn=self.collate)
        n_t = m.noise_scheduler().config.num_train_timesteps
        device = next(m.unet.parameters()).device
        g = torch.Generator(device=device).manual_seed(self.opts.eval_seed)
        total, count, offset = 0.0, 0, 0
        for batch in loader:
            if not batch:
                continue
            b = len(batch["pixel_values"])
            # timestep of the i-th record: fixed by its position, spread over the schedule
            idx = torch.arange(offset, offset + b)
            t = (idx * 9973 + 17) % n_t
            with self.ctx.autocast():
                loss = self.loss(m, batch, generator=g, timesteps=t.to(device))["loss"]
            total, count, offset = total + float(loss) * b, count + b, offset + b
        return total / max(count, 1)

    def evaluate(self, model, records) -> Evaluation:
        records = _with_captions(records)
        if not records:
            return Evaluation({})
        out = {"sd.denoise_loss": self.denoise_loss(model, records)}
        if self.opts.clip_checkpoint:
            out["sd.clip_score"] = self.clip_score(model, records)
        return Evaluation(out)

    def clip_score(self, model, records) -> float:
        """100 × mean max(cos, 0) between generated images and their prompts (an mmtune run)."""
        from mmtune.runs import load_run

        prompts = [r.captions[0] for r in records[: self.opts.clip_prompts]]
        m = model
        size, o = self.processor.image_size, self.opts
        generated = _sample(m, size, prompts, 1, self.cfg.seed, o.guidance, o.clip_steps)
        images = [ims[0] for ims in generated]
        clip, proc = load_run(self.opts.clip_checkpoint)
        with torch.no_grad():
            img = clip.encode_image(proc.images(images))
            txt = clip.encode_text(**proc.tokenize(prompts))
        return float(100 * (img * txt).sum(-1).clamp(min=0).mean())

    def predict_inputs(self, records) -> list[dict]:
        return [{"prompt": r.captions[0], "n": 1, "steps": 2} for r in _with_captions(records)]

    def predict(self, model, inputs: list[dict]) -> list[dict]:
        """Each input {"prompt", "n"?, "seed"?, "steps"?} → {"prompt", "images": [base64 PNG]}."""
        import base64
        import io

        m = model
        out = []
        for inp in inputs:
            prompt = inp.get("prompt")
            if not isinstance(prompt, str):
                raise DataError("sd-lora predicts from {'prompt': text}")
            n, steps = int(inp.get("n", 1)), int(inp.get("steps", 20))
            if not (1 <= n <= 64 and 1 <= steps <= 1000):
                raise DataError(f"n must be 1..64 and steps 1..1000 (got n={n}, steps={steps})")
            seed = int(inp.get("seed", self.cfg.seed))
            size = self.processor.image_size
            images = _sample(m, size, [prompt], n, seed, self.opts.guidance, steps)[0]
            encoded = []
            for im in images:
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                encoded.append(base64.b64encode(buf.getvalue()).decode("ascii"))
            out.append({"prompt": prompt, "images": encoded})
        return out

    def generate(self, model, prompts: list[str], n: int, seed: int, settings: dict) -> list[list]:
        """n PIL images per prompt (DDIM); settings: guidance, steps (None: the run's / 20)."""
        guidance = settings.get("guidance")
        guidance = self.opts.guidance if guidance is None else guidance
        steps = settings.get("steps") or 20
        return _sample(model, self.processor.image_size, prompts, n, seed, float(guidance), steps)

    def default_reranker(self) -> str | None:
        return self.opts.reranker


# ---------------------------------------------------------------- generation


def _pipeline(model: SDLoRAModel):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def _sample(model: SDLoRAModel, size: int, prompts, n, seed, guidance, steps):
    pipe = _pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    device = next(model.unet.parameters()).device
    out = []
    for prompt in prompts:
        g = torch.Generator(device=device).manual_seed(seed)  # a prompt's images: seed only
        res = pipe(
            prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=n,
            generator=g,
            output_type="pil",
        )
        out.append(list(res.images))
    return out


def generate_images(run_dir, prompts: list[str], n: int, seed: int, guidance: float, steps: int = 20) -> list[list]:
    """n PIL images per prompt from a sd-lora run (base + LoRA), DDIM sampling.

    Each prompt's images depend only on (prompt, n, seed, guidance, steps), not on the others.
    """
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise ConfigError("generate_images needs a list of prompt strings")
    if n < 1 or steps < 1:
        raise ConfigError(f"n and steps must be at least 1 (got n={n}, steps={steps})")
    model, proc = load_sd_run(run_dir)
    if torch.cuda.is_available():
        model.to("cuda")
    return _sample(model, proc.image_size, prompts, n, seed, guidance, steps)
