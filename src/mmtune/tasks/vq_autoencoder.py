"""Image tokenizer training (`task: vq-autoencoder`): a VQ autoencoder with L1 + adversarial
losses (`mmtune.models.vq`).

The model is built from `options` (`model.name` is not used: the tokenizer reads pixels only).
The discriminator trains in the same optimizer step on its own hinge loss, in its
own parameter group (`options.disc_lr_scale`); the generator's adversarial term starts after
`options.adv_start` steps. Evaluation: reconstruction PSNR (dB, per image on [0, 1] pixels,
averaged), L1, codebook usage and perplexity, and a reconstruction strip in `plots/`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmtune.data import ImageTextDataset
from mmtune.data.images import load_image
from mmtune.errors import ConfigError
from mmtune.models.load import Processor, load_processor, save_processor
from mmtune.models.vq import VQModel, vq_losses
from mmtune.tasks.base import Evaluation, Task


class VQOptions(BaseModel):
    """`options:` of the vq-autoencoder task."""

    model_config = ConfigDict(extra="forbid")
    image_size: int = Field(32, ge=8, description="Images are resized to this square size.")
    downsample: int = Field(4, description="Image side / token grid side (a power of two).")
    channels: int = Field(16, ge=8, description="Width of the first conv level (doubles per level).")
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


def strip(originals: torch.Tensor, recons: torch.Tensor):
    """Originals above, reconstructions below, as one PIL image."""
    from mmtune.generation import grid, to_pil

    rows = [to_pil(t, (0, 0, 0), (1, 1, 1)) for t in (originals, recons)]
    return grid(rows, scale=3)


class VQAutoencoderTask(Task):
    """Train an image tokenizer; evaluate reconstruction."""

    name = "vq-autoencoder"
    Options = VQOptions
    metric, higher_is_better = "vq.psnr", True
    routes = ("predict",)

    def __init__(self, ctx):
        super().__init__(ctx)
        if self.opts.image_size % self.opts.downsample:
            raise ConfigError("options.image_size must be a multiple of options.downsample")

    def spec(self) -> dict:
        o = self.opts
        return {
            k: getattr(o, k)
            for k in (
                "image_size",
                "downsample",
                "channels",
                "code_dim",
                "codes",
                "decay",
                "restart_every",
                "normalize",
                "disc_channels",
                "disc_layers",
                "disc_lr_scale",
            )
        }

    def build(self):
        self.processor = Processor(None, self.opts.image_size)  # pixels only: no text
        return VQModel(self.spec())

    def save(self, model, folder: Path) -> None:
        save_processor(self.processor, folder, {"vq": model.spec()})

    def load(self, folder: Path):
        self.processor, spec = load_processor(folder)
        return VQModel(spec.get("vq") or spec["wrap"]["spec"])  # `wrap`: runs of earlier versions

    def lr_scales(self, model) -> dict[str, float]:
        return model.lr_scales()

    def dataset(self, records, train: bool):
        return ImageTextDataset(records, self.processor.transform(augment=False), self.cfg.seed)

    def collate(self, items):
        items = [it for it in items if it is not None]
        if not items:
            return {}
        return {"pixel_values": torch.from_numpy(np.stack([it["pixel_values"] for it in items]))}

    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        o = self.opts
        out = vq_losses(model, batch["pixel_values"], o.adv_weight, o.adv_start, o.commit_weight, o.perceptual_weight)
        return {**out, "samples": len(batch["pixel_values"])}

    def _loader(self, records):
        return DataLoader(
            self.dataset(records, train=False),
            collate_fn=self.collate,
            batch_size=self.cfg.data.eval_batch_size,
            num_workers=0,
        )

    def evaluate(self, model, records) -> Evaluation:
        if not records:
            return Evaluation({})
        metrics, first = reconstruction_metrics(model, self._loader(records), self.processor)
        images = {} if first is None else {"vq_reconstructions": strip(*first)}
        return Evaluation(metrics, images=images)

    def predict_inputs(self, records) -> list[dict]:
        return [{"image": load_image(r.image)} for r in records]

    @torch.no_grad()
    def predict(self, model, inputs: list[dict]) -> list[dict]:
        """Each input {"image": PIL/path} → {"codes": [[…]], "psnr": dB of the reconstruction}."""
        tf = self.processor.transform()
        px = torch.from_numpy(np.stack([tf(load_image(inp["image"])) for inp in inputs]))
        rec, idx, _ = model.reconstruct(px)
        p = psnr(unnormalise(rec, self.processor), unnormalise(px, self.processor))
        g = int(math.isqrt(idx[0].numel()))
        return [{"codes": i.view(g, g).tolist(), "psnr": float(v)} for i, v in zip(idx, p, strict=True)]
