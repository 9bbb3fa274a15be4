"""Spatial cross-attention (`options.spatial`): image tokens on a square grid; each head reads
where it looked, and can look near, far from or away from where the previous layer looked."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmtune.models.attention import Block, attend, pack, unpack

SPATIAL_SCALE = 10.0  # the spatial weights' learning-rate multiplier: sharp within a few steps


def grid_positions(n: int, device=None) -> torch.Tensor:
    """(n, 2) positions in [-1, 1]² of n image tokens on a square grid (row-major, x then y),
    after a leading [CLS] at (0, 0) when n = s² + 1."""
    lead = 0 if math.isqrt(n) ** 2 == n else 1
    side = math.isqrt(n - lead)
    if side < 2 or side * side != n - lead:
        raise ValueError(f"spatial fusion needs a square grid of image tokens, got {n} tokens")
    c = torch.linspace(-1, 1, side, device=device)
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    cells = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
    return torch.cat([torch.zeros(lead, 2, device=device), cells])


class SpatialBlock(Block):
    """A fusion block whose cross-attention knows where the image tokens are.

    `forward` takes `where` = (memory positions (N, 2), what the previous block's heads looked at
    or None) and returns (x, what this block's heads looked at): (positions (B, h, L, 2),
    attention (B, h, L, N)).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads, cross=True)
        self.where_out = nn.Linear(2 * heads, dim)
        self.near = nn.Parameter(torch.zeros(heads, heads))
        self.avoid = nn.Parameter(torch.zeros(heads, heads))

    def forward(self, x, mask, memory, memory_mask=None, index=None, group=0, where=None):
        x = self.self_attend(x, mask)
        k, v, q, m = self.cross_inputs(x, memory, memory_mask)
        pos, before = where
        bias = self._spatial_bias(pos, before)  # (B, h, L, N) or None
        # the values carry each cell's position: the output then says where it looked
        v = torch.cat([v, pos.to(v.dtype).expand(*v.shape[:2], -1, -1)], dim=-1)
        n = q.shape[2]
        if group:
            q, bias = pack(q, group), None if bias is None else pack(bias, group)
        elif index is not None:
            k, v = k[index], v[index]
            m = None if m is None else m[index]
        o, att = attend(q, k, v, m, bias=bias, weights=True)
        if group:
            o, att = unpack(o, group, n), unpack(att, group, n)
        o, seen = o[..., :-2], o[..., -2:]  # (B, h, L, 2): where each head looked
        x = x + self.where_out(seen.transpose(1, 2).flatten(2))
        x = x + self.out2(self._merge(o))
        return x + self.mlp(self.ln3(x)), (seen, att)

    def _spatial_bias(self, pos: torch.Tensor, before) -> torch.Tensor | None:
        """Attention bias (B, h, L, N) from what each head of the previous block looked at: a
        learned mix, per head, of every cell's squared distance to where it looked (negative
        weight: near, positive: far) and of its attention there (negative: look elsewhere — the
        object itself is not the one closest to it)."""
        if before is None:
            return None
        seen, att = before
        d2 = ((pos[None, None, None] - seen.unsqueeze(-2).to(pos.dtype)) ** 2).sum(-1)
        w = self.near.to(d2.dtype) * SPATIAL_SCALE
        u = self.avoid.to(att.dtype) * SPATIAL_SCALE
        return torch.einsum("gh,bhln->bgln", w, d2) + torch.einsum("gh,bhln->bgln", u, att)
