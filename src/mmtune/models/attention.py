"""Attention written out, and the pre-LN transformer block the fusion encoder, decoders and conv-stem tower share."""

from __future__ import annotations

import torch
from torch import nn


def attend(q, k, v, mask=None, causal: bool = False, bias=None, weights: bool = False):
    """Softmax attention (B, h, L, d) written out: at these sizes plain matmuls beat the fused
    CPU kernels, whose backward is several times slower. mask: True = may attend; bias is added
    to the logits; weights=True also returns the attention weights (B, h, L, N)."""
    att = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (B, h, L, N)
    if bias is not None:
        att = att + bias.to(att.dtype)
    if causal:
        n = q.shape[-2]
        tri = torch.ones(n, k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = tri if mask is None else mask & tri
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = att.softmax(-1).to(v.dtype)
    return (att @ v, att) if weights else att @ v


def pack(t: torch.Tensor, group: int) -> torch.Tensor:
    """(B, h, n, X) with runs of `group` rows per image → (B/group, h, group·n, X)."""
    b, h, n, x = t.shape
    return t.reshape(b // group, group, h, n, x).transpose(1, 2).reshape(-1, h, group * n, x)


def unpack(t: torch.Tensor, group: int, n: int) -> torch.Tensor:
    """The inverse of `pack`: (B/group, h, group·n, X) → (B, h, n, X)."""
    h, x = t.shape[1], t.shape[-1]
    return t.view(-1, h, group, n, x).transpose(1, 2).reshape(-1, h, n, x)


def equal_runs(index: torch.Tensor | None, rows: int) -> int:
    """k when index is 0×k, 1×k, …, (rows-1)×k (every image has k questions, in order), else 0."""
    if index is None or len(index) % max(1, rows):
        return 0
    k = len(index) // rows
    expected = torch.arange(rows, device=index.device).repeat_interleave(k)
    return k if torch.equal(index, expected) else 0


class Block(nn.Module):
    """Pre-LN transformer block: self-attention (causal or not), optional cross-attention, MLP."""

    def __init__(self, dim: int, heads: int, cross: bool, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.qkv, self.out1 = (
            nn.LayerNorm(dim),
            nn.Linear(dim, 3 * dim),
            nn.Linear(dim, dim),
        )
        self.cross = cross
        if cross:
            self.ln2, self.q = nn.LayerNorm(dim), nn.Linear(dim, dim)
            self.kv, self.out2 = nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.ln3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, h, N, d/h)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, x, mask=None, memory=None, memory_mask=None, index=None, group=0):
        """x (B, L, D); mask (B, L) of valid keys; memory (B_m, N, D); index (B,) rows of memory.

        group > 0: rows come in runs of `group` per memory row (index = 0,0,…,1,1,…), so the
        queries of a run are packed into one row and attend to their memory without copying it.
        """
        x = self.self_attend(x, mask)
        if self.cross and memory is not None:
            k, v, q, m = self.cross_inputs(x, memory, memory_mask)
            n = q.shape[2]
            if group:
                q = pack(q, group)
            elif index is not None:
                k, v = k[index], v[index]
                m = None if m is None else m[index]
            o = attend(q, k, v, m)
            x = x + self.out2(self._merge(unpack(o, group, n) if group else o))
        return x + self.mlp(self.ln3(x))

    def self_attend(self, x, mask=None) -> torch.Tensor:
        """x + self-attention over x (B, L, D); mask (B, L) of valid keys."""
        q, k, v = self._split(self.qkv(self.ln1(x))).chunk(3, dim=-1)
        attn_mask = None if mask is None else mask[:, None, None, :].bool()  # (B, 1, 1, L)
        return x + self.out1(self._merge(attend(q, k, v, attn_mask, self.causal)))

    def cross_inputs(self, x, memory, memory_mask=None):
        """Keys and values (B_m, h, N, d) once per memory row, queries (B, h, L, d), mask."""
        k, v = self._split(self.kv(memory)).chunk(2, dim=-1)
        q = self._split(self.q(self.ln2(x)))
        m = None if memory_mask is None else memory_mask[:, None, None, :].bool()
        return k, v, q, m
