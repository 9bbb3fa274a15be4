"""Temporal pooling of per-frame embeddings into one video embedding: `middle`, `mean`, `transformer`."""

from __future__ import annotations

import torch
from torch import nn

from mmtune.models.attention import Block

POOLINGS = ("middle", "mean", "transformer")


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of x (B, T, D) where mask (B, T) is true (all of T when mask is None)."""
    m = mask.unsqueeze(-1).to(x.dtype) if mask is not None else torch.ones_like(x[..., :1])
    return (x * m).sum(1) / m.sum(1).clamp(min=1e-6)


def middle_frame(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: only the middle one of each row's valid frames ((n - 1) // 2 of n)."""
    mask = mask.bool()
    mid = (mask.sum(1, keepdim=True) - 1) // 2
    return mask & (mask.long().cumsum(1) - 1 == mid)


class TemporalPool(nn.Module):
    """Frame embeddings (B, T, D) + frame_mask (B, T) → clip embedding (B, D).

    `middle`: the middle valid frame alone (a single-frame baseline); `mean`: the masked mean;
    `transformer`: pre-LN self-attention blocks over the frames with learnt frame positions, whose
    output enters through a zero-initialised projection added to each frame before the masked mean
    — so at the start it is exactly `mean`, and padding frames are never attended to.
    """

    def __init__(self, kind: str, dim: int, max_frames: int = 8, layers: int = 2, heads: int = 4):
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"unknown temporal pooling {kind!r} (one of {', '.join(POOLINGS)})")
        self.kind, self.dim, self.max_frames, self.layers, self.heads = kind, dim, max_frames, layers, heads
        if kind == "transformer":
            if dim % heads:
                raise ValueError(f"temporal heads {heads} must divide the embedding size {dim}")
            self.pos = nn.Parameter(torch.randn(max_frames, dim) * 0.02)
            self.blocks = nn.ModuleList(Block(dim, heads, cross=False) for _ in range(layers))
            self.norm = nn.LayerNorm(dim)
            self.out = nn.Linear(dim, dim)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def spec(self) -> dict:
        """What rebuilds this module (`TemporalPool(**spec)`)."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "max_frames": self.max_frames,
            "layers": self.layers,
            "heads": self.heads,
        }

    def keep(self, mask: torch.Tensor) -> torch.Tensor:
        """The frames the image tower must encode: the middle one for `middle`, else every valid one."""
        return middle_frame(mask) if self.kind == "middle" else mask.bool()

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind != "transformer":
            return masked_mean(frames, mask)
        t = frames.shape[1]
        if t > self.max_frames:
            raise ValueError(
                f"{t} frames per clip, more than the {self.max_frames} this temporal encoder has positions for"
            )
        h = frames + self.pos[:t].to(frames.dtype)
        for block in self.blocks:
            h = block(h, mask)
        return masked_mean(frames + self.out(self.norm(h)), mask)
