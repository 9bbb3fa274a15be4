"""The text-to-image prior: a decoder-only transformer over [caption tokens ; image tokens].

Caption word pieces (a compact vocabulary, [PAD] = 0) fill a fixed-length prefix, a [BOS] token
follows, then the image's code indices in raster order; position t predicts image token t. The
image tokens come from a trained `VQModel`, frozen and carried inside `Text2ImageModel`, so a
text2image run folder alone turns prompts into pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtune.models.vq import VQModel


def rope_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(T, head_dim // 2) rotation angles of 2-D rotary embeddings: the first half of each head's
    channel pairs turn with the row, the second half with the column."""
    n = head_dim // 4
    freq = 1.0 / (16.0 ** (torch.arange(n, dtype=torch.float32) / n))
    return torch.cat([rows[:, None] * freq, cols[:, None] * freq], 1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of (B, H, T, Dh) by (T, Dh // 2) angles (the rest untouched)."""
    m = 2 * angles.shape[1]
    a, rest = x[..., :m], x[..., m:]
    x1, x2 = a[..., 0::2], a[..., 1::2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    r = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
    return torch.cat([r, rest], -1)


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP, with an optional key/value cache for sampling."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cache: list | None = None, rope: torch.Tensor | None = None):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # (B, H, T, Dh)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        if cache is not None:
            if cache:  # earlier positions' keys and values
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        # a fresh (prefix) pass is causal; one new token attends to every cached position
        causal = cache is None or k.shape[2] == t
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal and t > 1)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class Prior(nn.Module):
    """Next-image-token model; `spec` holds text_vocab, text_len, codes, tokens, dim, layers,
    heads, dropout."""

    def __init__(self, spec: dict):
        super().__init__()
        s = spec
        self.text_vocab, self.text_len = s["text_vocab"], s["text_len"]
        self.codes, self.tokens = s["codes"], s["tokens"]
        self.bos = self.text_vocab + self.codes  # embedding row of [BOS]
        self.embed = nn.Embedding(self.text_vocab + self.codes + 1, s["dim"])
        # rope2d: image slots carry no absolute position embedding; their queries and keys turn
        # with the (row, column) of the token they predict, so attention among image tokens sees
        # only offsets and an object is drawn the same way in every quadrant
        self.rope2d = bool(s.get("rope2d"))
        slots = self.text_len if self.rope2d else self.text_len + self.tokens
        self.pos = nn.Parameter(torch.zeros(1, slots, s["dim"]))
        nn.init.normal_(self.pos, std=0.02)
        angles = None
        if self.rope2d:
            side = round(self.tokens**0.5)
            t = torch.arange(self.text_len + self.tokens) - self.text_len
            r = torch.where(t >= 0, t // side, 0).float()
            c = torch.where(t >= 0, t % side, 0).float()
            angles = rope_angles(r, c, s["dim"] // s["heads"])
        self.register_buffer("angles", angles, persistent=False)  # None without rope2d
        self.blocks = nn.ModuleList(Block(s["dim"], s["heads"], s.get("dropout", 0.0)) for _ in range(s["layers"]))
        self.ln = nn.LayerNorm(s["dim"])
        self.head = nn.Linear(s["dim"], self.codes)

    def _inputs(self, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Embedding indices [text ; BOS ; codes] (codes shifted past the text vocabulary)."""
        bos = torch.full((len(text_ids), 1), self.bos, dtype=torch.long, device=text_ids.device)
        return torch.cat([text_ids, bos, codes + self.text_vocab], 1)

    def _embed(self, x: torch.Tensor, start: int):
        """Token + position embeddings of slots start… (slot text_len + t predicts image token t),
        and their rotary angles (None without rope2d)."""
        h = self.embed(x)
        end = start + x.shape[1]
        if self.rope2d:
            pos = self.pos[:, start : min(end, self.text_len)]
            h = torch.cat([h[:, : pos.shape[1]] + pos, h[:, pos.shape[1] :]], 1)
            return h, self.angles[start:end]
        return h + self.pos[:, start:end], None

    def forward(self, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, tokens, codes): row t predicts codes[:, t]."""
        x = self._inputs(text_ids, codes[:, :-1])
        h, rope = self._embed(x, 0)
        for blk in self.blocks:
            h = blk(h, rope=rope)
        return self.head(self.ln(h[:, self.text_len :]))  # from [BOS] on

    def loss(self, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the image tokens only (the caption is context, never a target)."""
        logits = self(text_ids, codes)
        return F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())

    def start(self, text_ids: torch.Tensor):
        """Run the prefix [text ; BOS]: → (logits of image token 0, per-block caches)."""
        caches = [[] for _ in self.blocks]
        x = self._inputs(text_ids, text_ids.new_zeros((len(text_ids), 0)))
        h, rope = self._embed(x, 0)
        for blk, c in zip(self.blocks, caches, strict=True):
            h = blk(h, c, rope)
        return self.head(self.ln(h[:, -1])), caches

    def step(self, code: torch.Tensor, position: int, caches):
        """Feed image token `position` (B,) → logits of token position + 1."""
        at = self.text_len + 1 + position  # after the text and [BOS]
        h, rope = self._embed(code[:, None] + self.text_vocab, at)
        for blk, c in zip(self.blocks, caches, strict=True):
            h = blk(h, c, rope)
        return self.head(self.ln(h[:, -1]))


@torch.no_grad()
def sample(
    prior: Prior,
    text_ids: torch.Tensor,
    null_ids: torch.Tensor | None = None,
    guidance: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, tokens) image codes for (B, text_len) captions, drawn token by token.

    With `guidance` ≠ 1 and `null_ids` (the empty caption), logits are
    uncond + guidance · (cond − uncond) (classifier-free guidance); then divided by
    `temperature` and, with `top_k`, restricted to the k likeliest codes.
    """
    b = len(text_ids)
    guided = null_ids is not None and guidance != 1.0
    ids = torch.cat([text_ids, null_ids.expand(b, -1)]) if guided else text_ids
    logits, caches = prior.start(ids)
    out = []
    for t in range(prior.tokens):
        logits = logits.float()
        if guided:
            cond, uncond = logits[:b], logits[b:]
            logits = uncond + guidance * (cond - uncond)
        logits = logits / max(temperature, 1e-5)
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        code = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        out.append(code)
        if t + 1 < prior.tokens:
            logits = prior.step(torch.cat([code, code]) if guided else code, t, caches)
    return torch.stack(out, 1)


class Text2ImageModel(nn.Module):
    """The prior plus the frozen image tokenizer that turns its codes into pixels."""

    def __init__(self, spec: dict):
        super().__init__()
        self._spec = dict(spec)
        self.vq = VQModel(spec["vq"])
        self.vq.requires_grad_(False)
        self.prior = Prior(spec["prior"])

    def spec(self) -> dict:
        return dict(self._spec)

    @property
    def vocab_ids(self) -> list[int]:
        """Tokenizer id of each compact text index ([PAD] first)."""
        return self._spec["vocab_ids"]

    def train(self, mode: bool = True):
        super().train(mode)
        self.vq.eval()  # frozen: its codebook EMA never moves
        return self

    def forward(self, text_ids, codes):
        """The prior's teacher-forced loss of image codes (B, T) given caption ids (B, L)."""
        return self.prior.loss(text_ids, codes)
