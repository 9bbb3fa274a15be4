"""Text decoders over a compact vocabulary (answers, captions), MLM head, greedy and beam search."""

from __future__ import annotations

import torch
from torch import nn

from mmtune.models.attention import Block


class TextDecoder(nn.Module):
    """Causal decoder over a compact vocabulary (the tokenizer ids its targets use), cross-attending
    to a memory (B_m, N, D_m). Ids are compact: `to_compact` / `vocab_ids` map both ways.
    `frames` > 0: the memory may be the tokens of up to that many video frames (`frame_memory`),
    each frame's tokens marked with a learnt frame position."""

    def __init__(
        self,
        vocab_ids: list[int],
        memory_dim: int,
        dim: int,
        layers: int,
        heads: int,
        max_len: int = 64,
        frames: int = 0,
    ):
        super().__init__()
        self.vocab_ids, self.max_len, self.frames = list(vocab_ids), max_len, frames
        if frames:
            self.frame_pos = nn.Parameter(torch.randn(frames, memory_dim) * 0.02)
        self.embed = nn.Embedding(len(vocab_ids), dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.memory_in = nn.Sequential(nn.Linear(memory_dim, dim), nn.LayerNorm(dim))
        self.blocks = nn.ModuleList(Block(dim, heads, cross=True, causal=True) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        nn.init.normal_(self.pos, std=0.02)
        self.register_buffer("lookup", compact_lookup(vocab_ids), persistent=False)

    def to_compact(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.clamp(max=len(self.lookup) - 1)
        return self.lookup.to(ids.device)[ids]

    def frame_memory(self, tokens: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame tokens (B, T, N, D_m) + frame_mask (B, T) → memory (B, T·N, D_m), each frame's
        tokens plus its frame position, and the memory mask (B, T·N): padding frames unseen."""
        b, t, n, _ = tokens.shape
        if t > self.frames:
            raise ValueError(f"{t} frames per clip, more than the {self.frames} this decoder has positions for")
        mem = tokens + self.frame_pos[:t, None].to(tokens.dtype)
        return mem.flatten(1, 2), frame_mask.bool()[:, :, None].expand(b, t, n).flatten(1)

    def forward(self, ids, memory, memory_mask=None, index=None) -> torch.Tensor:
        """ids (B, T) compact → logits (B, T, V); memory rows picked by index (B,)."""
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        mem = self.memory_in(memory)
        for blk in self.blocks:
            x = blk(x, None, mem, memory_mask, index)
        return self.ln(x) @ self.embed.weight.T  # tied output embedding


def compact_lookup(vocab_ids: list[int]) -> torch.Tensor:
    """tokenizer id → compact index; ids outside the vocabulary map to 1 ([UNK], see build_vocab)."""
    lookup = torch.full((max(vocab_ids) + 1,), 1, dtype=torch.long)
    lookup[torch.tensor(vocab_ids)] = torch.arange(len(vocab_ids))
    return lookup


class MLMHead(nn.Module):
    """Fused tokens (B, L, D) → logits over a compact vocabulary (B, L, V)."""

    def __init__(self, vocab_ids: list[int], dim: int):
        super().__init__()
        self.vocab_ids = list(vocab_ids)
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Linear(dim, len(vocab_ids)))
        self.register_buffer("lookup", compact_lookup(vocab_ids), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@torch.no_grad()
def greedy_decode(
    decoder: TextDecoder,
    memory,
    memory_mask=None,
    index=None,
    bos: int = 101,
    eos: int = 102,
    max_len: int | None = None,
) -> list[list[int]]:
    """Greedy decoding → tokenizer ids per row (without BOS/EOS); no KV cache: T is small."""
    rows = len(index) if index is not None else memory.shape[0]
    max_len = min(max_len or decoder.max_len, decoder.max_len)
    bos_c, eos_c = decoder.to_compact(torch.tensor([bos, eos])).tolist()
    ids = torch.full((rows, 1), bos_c, dtype=torch.long, device=memory.device)
    done = torch.zeros(rows, dtype=torch.bool, device=memory.device)
    for _ in range(max_len - 1):
        nxt = decoder(ids, memory, memory_mask, index)[:, -1].float().argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos_c), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == eos_c
        if bool(done.all()):
            break
    return [_strip(decoder, row, eos_c) for row in ids[:, 1:].tolist()]


def _strip(decoder: TextDecoder, row: list[int], eos_c: int) -> list[int]:
    row = row[: row.index(eos_c)] if eos_c in row else row
    return [decoder.vocab_ids[i] for i in row]


@torch.no_grad()
def beam_search(
    decoder: TextDecoder,
    memory,
    beams: int = 3,
    bos: int = 101,
    eos: int = 102,
    max_len: int | None = None,
    length_penalty: float = 1.0,
    memory_mask=None,
) -> list[list[int]]:
    """Beam search per memory row (B, N, D) (memory_mask (B, N): the tokens it may attend to) →
    tokenizer ids; finished hypotheses are ranked by log-probability / length**length_penalty."""
    max_len = min(max_len or decoder.max_len, decoder.max_len)
    bos_c, eos_c = decoder.to_compact(torch.tensor([bos, eos])).tolist()
    out = []
    for b in range(memory.shape[0]):
        mem = memory[b : b + 1]
        mask = None if memory_mask is None else memory_mask[b : b + 1]
        alive = [([bos_c], 0.0)]
        finished: list[tuple[list[int], float]] = []
        for _ in range(max_len - 1):
            ids = torch.tensor([s for s, _ in alive], device=memory.device)
            index = torch.zeros(len(alive), dtype=torch.long, device=memory.device)
            logp = decoder(ids, mem, mask, index)[:, -1].float().log_softmax(-1)  # (A, V)
            total = torch.tensor([sc for _, sc in alive], device=memory.device)[:, None] + logp
            top = total.flatten().topk(min(beams, total.numel()))
            alive_next = []
            for score, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                a, tok = divmod(flat, logp.shape[1])
                seq = alive[a][0] + [tok]
                (finished if tok == eos_c else alive_next).append((seq, score))
            alive = alive_next
            if not alive or len(finished) >= beams:
                break
        finished += alive  # unfinished at max_len still compete
        best = max(finished, key=lambda h: h[1] / max(1, len(h[0]) - 1) ** length_penalty)
        out.append(_strip(decoder, best[0][1:], eos_c))
    return out


def build_vocab(
    tokenizer, texts: list[str], specials: tuple[str, ...] = ("pad", "unk", "cls", "sep", "mask")
) -> list[int]:
    """Compact decoder vocabulary: the `specials` ([PAD], [UNK], [CLS], [SEP], [MASK]), then every
    tokenizer id the texts use (sorted) — a softmax over tens of ids, not the tokenizer's 30k."""
    special = [getattr(tokenizer, f"{name}_token_id") for name in specials]
    special = [i for i in special if i is not None]
    seen = set()
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        seen.update(ids)
    return special + sorted(seen - set(special))
