"""Dual encoders with one vocabulary: encode_image, encode_text, logit_scale, towers, blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmtune.models.temporal import TemporalPool, masked_mean

MAX_LOGIT_SCALE = 100.0


class _DualEncoderVerbs(nn.Module):
    """What every mmtune model offers; subclasses provide the raw tower features.

    Subclasses implement `_image(pixel_values) -> (pooled (B, D), tokens (B, N, H))`,
    `_text_pooled(input_ids, attention_mask) -> (B, H)`, `_text_head(pooled) -> (B, D)`,
    `tower(name) -> nn.Module` and set `logit_scale` (a log-scale Parameter) / `logit_bias`.
    """

    text_locked: bool = False

    def _init_cache(self) -> None:
        self._text_cache: dict[bytes, torch.Tensor] = {}
        self.temporal: TemporalPool | None = None  # how encode_video pools frames (None: mean)

    def set_temporal(self, pool: TemporalPool | None) -> None:
        """Pool frames over time with `pool` in `encode_video` (its parameters become the model's)."""
        if pool is None:
            self._modules.pop("temporal", None)
            object.__setattr__(self, "temporal", None)
        else:
            self.temporal = pool

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 as in CLIP."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, S, S) → (B, D)."""
        pooled, _ = self._image(pixel_values)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_video(
        self, pixel_values: torch.Tensor, frame_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Frames (B, T, 3, S, S) with frame_mask (B, T) (1: a frame, 0: padding) → (B, D): the
        image tower on every frame the pooling needs, then `self.temporal` over time (the masked
        mean of the normalised frame embeddings when none)."""
        b, t = pixel_values.shape[:2]
        mask = torch.ones(b, t, dtype=torch.bool, device=pixel_values.device) if frame_mask is None else frame_mask
        mask = mask.bool() if self.temporal is None else self.temporal.keep(mask)
        flat = self.encode_image(pixel_values[mask])  # (M, D) of the kept frames
        frames = flat.new_zeros(b, t, flat.shape[-1]).index_put((mask,), flat)
        out = masked_mean(frames, mask) if self.temporal is None else self.temporal(frames, mask)
        return F.normalize(out, dim=-1) if normalize else out

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → patch tokens (B, N, H) of the last vision layer."""
        return self._image(pixel_values)[1]

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize=True
    ) -> torch.Tensor:
        """(B, L) token ids → (B, D); a locked text tower's features come from a cache."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.text_locked:
            pooled = self._cached_text(input_ids, attention_mask)
        else:
            pooled = self._text_pooled(input_ids, attention_mask)
        out = self._text_head(pooled)
        return F.normalize(out, dim=-1) if normalize else out

    def _cached_text(self, input_ids, attention_mask) -> torch.Tensor:
        keys = [ids[mask.bool()].cpu().numpy().tobytes() for ids, mask in zip(input_ids, attention_mask, strict=True)]
        todo = sorted({i for i, k in enumerate(keys) if k not in self._text_cache})
        if todo:
            was_training = self.tower("text").training
            self.tower("text").eval()  # a locked tower has no dropout: features are fixed
            with torch.no_grad():
                feats = self._text_pooled(input_ids[todo], attention_mask[todo]).float()
            self.tower("text").train(was_training)
            for i, f in zip(todo, feats, strict=True):
                self._text_cache[keys[i]] = f
        return torch.stack([self._text_cache[k] for k in keys]).to(input_ids.device)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    def set_patch_dropout(self, fraction: float) -> None:
        """Drop this fraction of image patch tokens at random while training (FLIP); 0 disables.

        Acts on the output of the vision tower's patch embeddings, so any ViT-like tower works;
        a class token, when the tower has one, is always kept. Evaluation sees every patch.
        """
        old = getattr(self, "_patch_dropout_hook", None)
        if old is not None:
            old.remove()
            self._patch_dropout_hook = None
        if fraction <= 0:
            return
        embeddings = getattr(self.tower("vision"), "embeddings", None)
        if embeddings is None:  # transformers' CLIP/SigLIP keep the ViT one level down
            embeddings = getattr(getattr(self.tower("vision"), "vision_model", None), "embeddings", None)
        if embeddings is None:
            raise ValueError("patch dropout needs a ViT-like vision tower (with `embeddings`)")
        keep_first = any(hasattr(embeddings, a) for a in ("class_embedding", "cls_token"))

        def hook(module, args, tokens):
            return patch_dropout(tokens, fraction, keep_first) if module.training else tokens

        self._patch_dropout_hook = embeddings.register_forward_hook(hook)

    def lock_text(self, locked: bool = True) -> None:
        """Freeze (or unfreeze) the text tower; while locked its features are cached."""
        self.text_locked = locked
        for p in self.tower("text").parameters():
            p.requires_grad_(not locked)
        self.clear_text_cache()

    def forward(self, pixel_values, input_ids, attention_mask=None) -> dict:
        """{image_emb (B, D), text_emb (B, D)} normalised, with the scale and bias the losses use.

        The scale goes through forward (not read beside it) so DDP sees every parameter used.
        """
        return {
            "image_emb": self.encode_image(pixel_values),
            "text_emb": self.encode_text(input_ids, attention_mask),
            "logit_scale": self.scale(),
            "logit_bias": self.logit_bias,
        }


def patch_dropout(tokens: torch.Tensor, fraction: float, keep_first: bool) -> torch.Tensor:
    """Keep a random ⌈(1 - fraction)·N⌉ of the N patch tokens of each image: (B, T, H) → (B, T', H).

    With `keep_first`, token 0 (the class token) is always kept and not counted in N.
    """
    head, patches = (tokens[:, :1], tokens[:, 1:]) if keep_first else (tokens[:, :0], tokens)
    b, n, h = patches.shape
    keep = max(1, math.ceil(n * (1.0 - fraction)))
    idx = torch.rand(b, n, device=tokens.device).argsort(dim=1)[:, :keep]  # (B, keep)
    kept = patches.gather(1, idx.unsqueeze(-1).expand(b, keep, h))
    return torch.cat([head, kept], dim=1)


def _pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        return masked_mean(hidden, mask)
    raise ValueError(f"unknown pooling {how!r}")


class DualEncoder(_DualEncoderVerbs):
    """A dual encoder composed of any vision and text towers with linear projections.

    `vision(pixel_values)` and `text(input_ids=..., attention_mask=...)` may return a tensor
    (B, H) / (B, N, H) or a transformers output with `last_hidden_state`; `*_pooling` picks
    `cls`, `mean` or `none` (the tower already returns (B, H)).
    """

    def __init__(
        self,
        vision: nn.Module,
        text: nn.Module,
        vision_dim: int,
        text_dim: int,
        embed_dim: int,
        vision_pooling: str = "cls",
        text_pooling: str = "mean",
        init_temperature: float = 0.07,
        logit_bias: float | None = None,
    ):
        super().__init__()
        self.vision, self.text = vision, text
        self.vision_pooling, self.text_pooling = vision_pooling, text_pooling
        self.vision_proj = nn.Linear(vision_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.logit_bias = None if logit_bias is None else nn.Parameter(torch.tensor(logit_bias))
        self._init_cache()

    def tower(self, name: str) -> nn.Module:
        return {"vision": self.vision, "text": self.text}[name]

    def add_logit_bias(self, bias: float = -10.0, scale: float = 10.0) -> None:
        """Give the model SigLIP's learnable bias, with SigLIP's initial scale and bias."""
        if self.logit_bias is None:
            self.logit_bias = nn.Parameter(torch.tensor(bias))
            with torch.no_grad():
                self.logit_scale.fill_(math.log(scale))

    def _image(self, pixel_values):
        out = self.vision(pixel_values)
        hidden = getattr(out, "last_hidden_state", out)
        if self.vision_pooling == "none":
            return self.vision_proj(hidden), hidden.unsqueeze(1)
        return self.vision_proj(_pool(hidden, None, self.vision_pooling)), hidden

    def _text_pooled(self, input_ids, attention_mask):
        if self.text_pooling == "none":
            return self.text(input_ids)
        if hasattr(self.text, "config"):  # a transformers model takes the mask by name
            out = self.text(input_ids=input_ids, attention_mask=attention_mask)
        else:
            out = self.text(input_ids)
        hidden = getattr(out, "last_hidden_state", out)
        return _pool(hidden, attention_mask, self.text_pooling)

    def _text_head(self, pooled):
        return self.text_proj(pooled.to(self.text_proj.weight.dtype))


class HFDualEncoder(_DualEncoderVerbs):
    """A transformers CLIP-family model (CLIP, SigLIP, Chinese-CLIP, AltCLIP…) with mmtune's verbs."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        self._init_cache()

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.hf.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return getattr(self.hf, "logit_bias", None)

    def tower(self, name: str) -> nn.Module:
        return {"vision": self.hf.vision_model, "text": self.hf.text_model}[name]

    def _image(self, pixel_values):
        out = self.hf.get_image_features(pixel_values=pixel_values)
        pooled = out if torch.is_tensor(out) else out.pooler_output
        tokens = None if torch.is_tensor(out) else out.last_hidden_state
        return pooled, tokens

    def _text_pooled(self, input_ids, attention_mask):
        # Projections are inside get_text_features, so the cached feature is the final one.
        out = self.hf.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return out if torch.is_tensor(out) else out.pooler_output

    def _text_head(self, pooled):
        return pooled


def tower_blocks(tower: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a tower, in order (first to last)."""
    best: list[nn.Module] = []
    for mod in tower.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > len(best):
            best = list(mod)
    return best
