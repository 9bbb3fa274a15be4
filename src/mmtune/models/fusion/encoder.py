"""The fusion encoder: text tokens self-attend and cross-attend to the image's tokens."""

from __future__ import annotations

import torch
from torch import nn

from mmtune.models.attention import Block, equal_runs
from mmtune.models.fusion.spatial import SpatialBlock, grid_positions


class FusionEncoder(nn.Module):
    """Text tokens (B, L, H_t) × image tokens (B_i, N, H_v) → fused text tokens (B, L, D)."""

    def __init__(self, text_dim: int, image_dim: int, dim: int, layers: int, heads: int, spatial: bool = False):
        super().__init__()
        self.spatial = spatial
        self.text_in = nn.Sequential(nn.Linear(text_dim, dim), nn.LayerNorm(dim))
        self.image_in = nn.Sequential(nn.Linear(image_dim, dim), nn.LayerNorm(dim))
        block = (lambda: SpatialBlock(dim, heads)) if spatial else (lambda: Block(dim, heads, cross=True))
        self.blocks = nn.ModuleList(block() for _ in range(layers))
        self.ln = nn.LayerNorm(dim)

    def forward(self, text, mask, image_tokens, index=None) -> torch.Tensor:
        x, mem = self.text_in(text), self.image_in(image_tokens)
        group = equal_runs(index, mem.shape[0])
        if not self.spatial:
            for blk in self.blocks:
                x = blk(x, mask, mem, None, index, group)
            return self.ln(x)
        pos, looked = grid_positions(mem.shape[1], mem.device), None
        for blk in self.blocks:
            x, looked = blk(x, mask, mem, None, index, group, where=(pos, looked))
        return self.ln(x)
