"""Image tokenizer training (`task: vq-autoencoder`): a VQ autoencoder with L1 + adversarial
losses (`mmtune.models.vq`).

The model is built from `options` (the configured `model.name` only lends its tokenizer to the
run folder). The discriminator trains in the same optimizer step on its own hinge loss, in its
own parameter group (`options.disc_lr_scale`); the generator's adversarial term starts after
`options.adv_start` steps. Evaluation: reconstruction PSNR (dB, per image on [0, 1] pixels,
averaged), L1, codebook usage and perplexity, and a reconstruction strip in `plots/`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmtune.config import validate_options
from mmtune.data import ImageTextDataset
from mmtune.data.images import load_image
from mmtune.errors import ConfigError
from mmtune.models.vq import VQModel, vq_losses


class VQOptions(BaseModel):
    """`options:` of the vq-autoencoder task."""

    model_config = ConfigDict(extra="forbid")
    image_size: int = Field(32, ge=8, description="Images are resized to this square size.")
    downsample: int = Field(4, description="Image side / token grid side (a power of two).")
    channels: int = Field(
        16, ge=8, description="Width of the first conv level (doubles per level)."
    )
    code_dim: int = Field(64, gt=0, description="Size of a code vector.")
    codes: int = Field(512, ge=2, description="Codebook size.")
    decay: float = Field(0.99, gt=0, lt=1, description="EMA decay of the codebook.")
    restart_every: int = Field(
        20, ge=0, description="Every N updates, codes unused since are re-initialised (0: never)."
    )
    normalize: bool = Field(True, description="Match l2-normalised features to unit-norm codes.")
    commit_weight: float = Field(0.25, ge=0, description="Weight of the commitment loss.")
    adv_weight: float = Field(0.1, ge=0, description="Weight of the generator's adversarial loss.")
    adv_start: int = Field(500, ge=0, description="Training steps before the adversarial loss.")
    perceptual_weight: float = Field(
        0.0, ge=0, description="Weight of an L1 on discriminator features (a perceptual term)."
    )
    disc_channels: int = Field(32, gt=0, description="Width of the patch discriminator.")
    disc_layers: int = Field(2, ge=1, description="Strided layers of the patch discriminator.")
    disc_lr_scale: float = Field(1.0, gt=0, description="Discriminator lr = train.lr × this.")

    @field_validator("downsample")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 1 or v & (v - 1):
            raise ValueError("must be a power of two (1, 2, 4, 8…)")
        return v


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [0, 1]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def unnormalise(pixels: torch.Tensor, processor) -> torch.Tensor:
    """Pixels in [0, 1] from the processor's normalised ones."""
    from mmtune.generation import unnormalise as from_stats

    return from_stats(pixels, processor.image_mean, processor.image_std)


def save_vq_spec(model, processor, folder, wrap_builder: str, spec: dict) -> None:
    """The configured backbone's spec (tokenizer, preprocessing) + the task model's, so
    `load_run` rebuilds the task model."""
    from mmtune.models.load import save_spec

    save_spec(model, processor, folder, extra={"wrap": {"builder": wrap_builder, "spec": spec}})


@torch.no_grad()
def reconstruction_metrics(vq: VQModel, loader, processor, desc: str = "reconstructing"):
    """→ ({vq.psnr, vq.l1, vq.codebook_usage, vq.perplexity}, first originals, reconstructions)."""
    vq.eval()
    psnrs, l1s, counts = [], [], torch.zeros(vq.quantizer.codes)
    first = None
    for batch in tqdm(loader, desc=desc, leave=False, disable=len(loader) < 5):
        px = batch["pixel_values"].to(next(vq.parameters()).device)
        rec, idx, _ = vq.reconstruct(px)
        x, r = unnormalise(px, processor), unnormalise(rec, processor)
        psnrs.append(psnr(r, x))
        l1s.append((r - x).abs().flatten(1).mean(1))
        counts += torch.bincount(idx.flatten().cpu(), minlength=len(counts)).float()
        if first is None:
            first = (x[:8], r[:8])
    p = counts / counts.sum().clamp_min(1)
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    metrics = {
        "vq.psnr": float(torch.cat(psnrs).mean()),
        "vq.l1": float(torch.cat(l1s).mean()),
        "vq.codebook_usage": float((counts > 0).float().mean()),
        "vq.perplexity": float(ent.exp()),
        "vq.dead_restarts": int(vq.quantizer.restarts),
    }
    return metrics, first


def save_strip(path, originals: torch.Tensor, recons: torch.Tensor) -> None:
    """Originals above, reconstructions below, as one PNG."""
    from mmtune.generation import grid, to_pil

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [to_pil(t, (0, 0, 0), (1, 1, 1)) for t in (originals, recons)]
    grid(rows, scale=3).save(path)


class VQAutoencoderTask:
    """Train an image tokenizer; evaluate reconstruction."""

    name = "vq-autoencoder"

    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.opts = validate_options(ctx.cfg, VQOptions)
        if self.opts.image_size % self.opts.downsample:
            raise ConfigError("options.image_size must be a multiple of options.downsample")
        if ctx.processor is not None and ctx.processor.image_size != self.opts.image_size:
            ctx.processor = dataclasses.replace(ctx.processor, image_size=self.opts.image_size)

    def spec(self) -> dict:
        o = self.opts
        return {k: getattr(o, k) for k in ("image_size", "downsample", "channels", "code_dim",
                "codes", "decay", "restart_every", "normalize", "disc_channels", "disc_layers",
                "disc_lr_scale")}  # fmt: skip

    def build_head(self, model):
        vq = VQModel(self.spec())
        save_vq_spec(model, self.ctx.processor, self.cfg.run_dir / "model",
                     "mmtune.models.vq:rebuild", vq.spec())  # fmt: skip
        return vq

    def dataset(self, records, train: bool):
        return ImageTextDataset(records, self.ctx.processor.transform(augment=False), self.cfg.seed)

    def collate(self, items):
        items = [it for it in items if it is not None]
        if not items:
            return {}
        return {"pixel_values": torch.from_numpy(np.stack([it["pixel_values"] for it in items]))}

    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        o = self.opts
        return model(vq_losses, pixel_values=batch["pixel_values"], adv_weight=o.adv_weight,
                     adv_start=o.adv_start, commit_weight=o.commit_weight,
                     perceptual_weight=o.perceptual_weight)  # fmt: skip

    def _loader(self, records):
        return DataLoader(self.dataset(records, train=False), collate_fn=self.collate,
                          batch_size=self.cfg.data.eval_batch_size, num_workers=0)  # fmt: skip

    def evaluate(self, model, records) -> dict[str, float]:
        model = getattr(model, "module", model)
        if not isinstance(model, VQModel):
            raise ConfigError("task vq-autoencoder needs a vq-autoencoder run")
        if not records:
            return {}
        metrics, first = reconstruction_metrics(model, self._loader(records), self.ctx.processor)
        if first is not None and self.cfg.run_dir.exists():
            save_strip(self.cfg.run_dir / "plots" / "vq_reconstructions.png", *first)
        return metrics

    @torch.no_grad()
    def predict(self, model, inputs: list[dict]) -> list[dict]:
        """Each input {"image": PIL/path} → {"codes": [[…]], "psnr": dB of the reconstruction}."""
        tf = self.ctx.processor.transform()
        px = torch.from_numpy(np.stack([tf(load_image(inp["image"])) for inp in inputs]))
        rec, idx, _ = model.reconstruct(px)
        p = psnr(unnormalise(rec, self.ctx.processor), unnormalise(px, self.ctx.processor))
        g = int(math.isqrt(idx[0].numel()))
        return [
            {"codes": i.view(g, g).tolist(), "psnr": float(v)} for i, v in zip(idx, p, strict=True)
        ]
