"""Fusion encoder, text decoders and task heads on top of a dual encoder (ALBEF-style).

The fusion encoder takes the dual encoder's text-token features, and each layer self-attends over
the text and cross-attends to the image patch tokens (`model.image_tokens`). Heads: an answer
classifier (`vqa`), a generative answer decoder (`answer`), a caption decoder cross-attending to
the patches (`caption`), image–text matching (`itm`) and masked language modelling (`mlm`).
`FusionModel` holds backbone + fusion + heads; its `spec()` is saved beside the backbone's spec so
`mmtune.models.load_run` rebuilds it (`rebuild`).

Several questions about one image share its patch tokens: `image_index` (B_q,) maps each text row
to its image row, so the vision tower and the cross-attention keys/values run once per image.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, Field
from torch import nn

from mmtune.models.dual import DualEncoder


class FusionOptions(BaseModel):
    """The fusion encoder's `options:`, shared by the tasks that build one (vqa, pretrain-fusion)."""

    fusion_layers: int = Field(4, ge=1, description="Depth of the fusion encoder.")
    fusion_dim: int = Field(128, gt=0, description="Width of the fusion encoder and decoders.")
    fusion_heads: int = Field(4, gt=0, description="Attention heads in fusion/decoder layers.")
    spatial: bool = Field(
        False,
        description="Spatial cross-attention (image tokens on a square grid): each head also "
        "reads where it looked, and can look near, far from or away from where the previous layer "
        "looked.",
    )

    def fusion_spec(self, heads_spec: dict, fusion: str = "cross-attention") -> dict:
        """The FusionModel spec these options describe, with the given heads."""
        return {"dim": self.fusion_dim, "layers": self.fusion_layers, "heads": self.fusion_heads,
                "fusion": fusion, "spatial": self.spatial, "heads_spec": heads_spec}  # fmt: skip


class Block(nn.Module):
    """Pre-LN transformer block: self-attention (causal or not), optional cross-attention, MLP."""

    def __init__(self, dim: int, heads: int, cross: bool, causal: bool = False,
                 spatial: bool = False):  # fmt: skip
        super().__init__()
        self.heads, self.causal, self.spatial = heads, causal, spatial
        self.ln1, self.qkv, self.out1 = (
            nn.LayerNorm(dim),
            nn.Linear(dim, 3 * dim),
            nn.Linear(dim, dim),
        )
        self.cross = cross
        if cross:
            self.ln2, self.q = nn.LayerNorm(dim), nn.Linear(dim, dim)
            self.kv, self.out2 = nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        if spatial:  # cross-attention that knows where the image tokens are (forward)
            self.where_out = nn.Linear(2 * heads, dim)
            self.near = nn.Parameter(torch.zeros(heads, heads))
            self.avoid = nn.Parameter(torch.zeros(heads, heads))
        self.ln3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, h, N, d/h)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, x, mask=None, memory=None, memory_mask=None, index=None, group=0,
                where=None):  # fmt: skip
        """x (B, L, D); mask (B, L) of valid keys; memory (B_m, N, D); index (B,) rows of memory.

        group > 0: rows come in runs of `group` per memory row (index = 0,0,…,1,1,…), so the
        queries of a run are packed into one row and attend to their memory without copying it.
        Spatial blocks take `where` = (memory positions (N, 2), what the previous block's heads
        looked at or None) and return (x, what this block's heads looked at): (positions
        (B, h, L, 2), attention (B, h, L, N)).
        """
        q, k, v = self._split(self.qkv(self.ln1(x))).chunk(3, dim=-1)
        attn_mask = None
        if mask is not None:
            attn_mask = mask[:, None, None, :].bool()  # (B, 1, 1, L)
        x = x + self.out1(self._merge(attend(q, k, v, attn_mask, self.causal)))
        looked = None
        if self.cross and memory is not None:
            k, v = self._split(self.kv(memory)).chunk(2, dim=-1)  # once per image: (B_m, h, N, d)
            q = self._split(self.q(self.ln2(x)))  # (B, h, L, d)
            m = None if memory_mask is None else memory_mask[:, None, None, :].bool()
            bias = None
            if self.spatial:
                pos, before = where
                bias = self._spatial_bias(pos, before)  # (B, h, L, N) or None
                # the values carry each cell's position: the output then says where it looked
                v = torch.cat([v, pos.to(v.dtype).expand(*v.shape[:2], -1, -1)], dim=-1)
            n = q.shape[2]
            if group:
                q, bias = _pack(q, group), None if bias is None else _pack(bias, group)
            elif index is not None:
                k, v = k[index], v[index]
                m = None if m is None else m[index]
            out = attend(q, k, v, m, bias=bias, weights=self.spatial)  # weights: spatial only
            o, att = out if self.spatial else (out, None)
            if group:
                o = _unpack(o, group, n)
                att = None if att is None else _unpack(att, group, n)
            if self.spatial:
                o, seen = o[..., :-2], o[..., -2:]  # (B, h, L, 2): where each head looked
                x = x + self.where_out(seen.transpose(1, 2).flatten(2))
                looked = (seen, att)
            x = x + self.out2(self._merge(o))
        x = x + self.mlp(self.ln3(x))
        return (x, looked) if self.spatial else x

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


SPATIAL_SCALE = 10.0  # the spatial weights' learning-rate multiplier: sharp within a few steps


def _pack(t: torch.Tensor, group: int) -> torch.Tensor:
    """(B, h, n, X) with runs of `group` rows per image → (B/group, h, group·n, X)."""
    b, h, n, x = t.shape
    return t.reshape(b // group, group, h, n, x).transpose(1, 2).reshape(-1, h, group * n, x)


def _unpack(t: torch.Tensor, group: int, n: int) -> torch.Tensor:
    """The inverse of `_pack`: (B/group, h, group·n, X) → (B, h, n, X)."""
    h, x = t.shape[1], t.shape[-1]
    return t.view(-1, h, group, n, x).transpose(1, 2).reshape(-1, h, n, x)


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


class FusionEncoder(nn.Module):
    """Text tokens (B, L, H_t) × image tokens (B_i, N, H_v) → fused text tokens (B, L, D)."""

    def __init__(self, text_dim: int, image_dim: int, dim: int, layers: int, heads: int,
                 spatial: bool = False):  # fmt: skip
        super().__init__()
        self.spatial = spatial
        self.text_in = nn.Sequential(nn.Linear(text_dim, dim), nn.LayerNorm(dim))
        self.image_in = nn.Sequential(nn.Linear(image_dim, dim), nn.LayerNorm(dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, cross=True, spatial=spatial) for _ in range(layers)
        )
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


def equal_runs(index: torch.Tensor | None, rows: int) -> int:
    """k when index is 0×k, 1×k, …, (rows-1)×k (every image has k questions, in order), else 0."""
    if index is None or len(index) % max(1, rows):
        return 0
    k = len(index) // rows
    expected = torch.arange(rows, device=index.device).repeat_interleave(k)
    return k if torch.equal(index, expected) else 0


class TextDecoder(nn.Module):
    """Causal decoder over a compact vocabulary (the tokenizer ids its targets use), cross-attending
    to a memory (B_m, N, D_m). Ids are compact: `to_compact` / `vocab_ids` map both ways."""

    def __init__(self, vocab_ids: list[int], memory_dim: int, dim: int, layers: int, heads: int,
                 max_len: int = 64):  # fmt: skip
        super().__init__()
        self.vocab_ids, self.max_len = list(vocab_ids), max_len
        self.embed = nn.Embedding(len(vocab_ids), dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.memory_in = nn.Sequential(nn.Linear(memory_dim, dim), nn.LayerNorm(dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, cross=True, causal=True) for _ in range(layers)
        )
        self.ln = nn.LayerNorm(dim)
        nn.init.normal_(self.pos, std=0.02)
        self.register_buffer("lookup", compact_lookup(vocab_ids), persistent=False)

    def to_compact(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.clamp(max=len(self.lookup) - 1)
        return self.lookup.to(ids.device)[ids]

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
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim),
                                 nn.Linear(dim, len(vocab_ids)))  # fmt: skip
        self.register_buffer("lookup", compact_lookup(vocab_ids), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def text_tokens(backbone, input_ids, attention_mask) -> torch.Tensor:
    """(B, L) ids → token features (B, L, H) of the backbone's text tower. Repeated rows (the same
    question about several images) run through the tower once."""
    tower = backbone.tower("text")
    rows, inverse = unique_rows(input_ids, attention_mask)
    out = tower(input_ids=input_ids[rows], attention_mask=attention_mask[rows])
    return out.last_hidden_state[inverse]


def unique_rows(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row of each distinct (ids, mask) row, index of every row's distinct row)."""
    keys = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    first = torch.full((len(uniq),), len(keys), dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(keys), device=keys.device), "amin")
    return first, inverse


def tower_dims(backbone) -> tuple[int, int, int]:
    """(image token dim, text token dim, embedding dim) of a dual encoder."""
    if isinstance(backbone, DualEncoder):
        return (backbone.vision_proj.in_features, backbone.text_proj.in_features,
                backbone.vision_proj.out_features)  # fmt: skip
    cfg = backbone.hf.config
    return cfg.vision_config.hidden_size, cfg.text_config.hidden_size, cfg.projection_dim


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.LayerNorm(d_hidden),
                         nn.Linear(d_hidden, d_out))  # fmt: skip


class FusionModel(nn.Module):
    """Backbone (dual encoder) + fusion encoder + named heads, built from a plain-dict spec.

    spec: {dim, layers, heads, fusion: "cross-attention" | "concat", heads_spec: {name: {...}}}
    where a head spec is {"kind": "classifier", "answers": [...]} (answer classifier),
    {"kind": "decoder", "vocab_ids": [...], "layers": n, "max_len": n, "memory": "fusion"|"image"},
    {"kind": "itm"} or {"kind": "mlm", "vocab_ids": [...]}.
    """

    def __init__(self, backbone, spec: dict):
        super().__init__()
        self.backbone, self._spec = backbone, {**spec, "heads_spec": dict(spec["heads_spec"])}
        img_dim, txt_dim, emb_dim = tower_dims(backbone)
        d, hd = spec["dim"], spec["heads"]
        self.fusion = None
        if spec["fusion"] == "cross-attention":
            self.fusion = FusionEncoder(txt_dim, img_dim, d, spec["layers"], hd,
                                        spatial=spec.get("spatial", False))  # fmt: skip
        self.head = nn.ModuleDict()
        for name, hs in spec["heads_spec"].items():
            self.head[name] = self._make_head(hs, d, hd, img_dim, emb_dim)

    def _make_head(self, hs: dict, d: int, hd: int, img_dim: int, emb_dim: int) -> nn.Module:
        kind = hs["kind"]
        if kind == "classifier":
            d_in = d if self.fusion is not None else 2 * emb_dim  # concat: pooled image + text
            return _mlp(d_in, 2 * max(d, emb_dim), len(hs["answers"]))
        if kind == "decoder":
            mem_dim = img_dim if hs["memory"] == "image" else d
            return TextDecoder(hs["vocab_ids"], mem_dim, d, hs["layers"], hd, hs["max_len"])
        if kind == "itm":
            return nn.Linear(d, 2)
        if kind == "mlm":
            return MLMHead(hs["vocab_ids"], d)
        raise ValueError(f"unknown head kind {kind!r}")

    def spec(self) -> dict:
        return self._spec

    def add_head(self, name: str, head_spec: dict) -> None:
        img_dim, _, emb_dim = tower_dims(self.backbone)
        ref = next(self.parameters())
        self.head[name] = self._make_head(
            head_spec, self._spec["dim"], self._spec["heads"], img_dim, emb_dim
        ).to(ref.device)
        self._spec["heads_spec"][name] = head_spec

    # the dual encoder's verbs, so freezing, embedding and serving code see one vocabulary
    def tower(self, name: str):
        return self.backbone.tower(name)

    def encode_image(self, pixel_values, normalize=True):
        return self.backbone.encode_image(pixel_values, normalize)

    def encode_text(self, input_ids, attention_mask=None, normalize=True):
        return self.backbone.encode_text(input_ids, attention_mask, normalize)

    def image_tokens(self, pixel_values):
        return self.backbone.image_tokens(pixel_values)

    def scale(self):
        return self.backbone.scale()

    @property
    def logit_bias(self):
        return self.backbone.logit_bias

    @property
    def text_locked(self) -> bool:
        return self.backbone.text_locked

    def fuse(self, image_tokens, input_ids, attention_mask, index=None) -> torch.Tensor:
        """Fused text tokens (B, L, D) of each text row with its image's patch tokens."""
        if self.fusion is None:
            raise ValueError("this model has no fusion encoder (fusion: concat)")
        text = text_tokens(self.backbone, input_ids, attention_mask)
        return self.fusion(text, attention_mask, image_tokens, index)

    def lock_text(self, locked: bool = True) -> None:
        self.backbone.lock_text(locked)

    @property
    def logit_scale(self):
        return self.backbone.logit_scale

    def forward(self, fn, **inputs):
        """Run a task's computation `fn(model, **inputs)`: through forward, so DDP sees every
        parameter the objective uses."""
        return fn(self, **inputs)


@torch.no_grad()
def greedy_decode(decoder: TextDecoder, memory, memory_mask=None, index=None, bos: int = 101,
                  eos: int = 102, max_len: int | None = None) -> list[list[int]]:  # fmt: skip
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
def beam_search(decoder: TextDecoder, memory, beams: int = 3, bos: int = 101, eos: int = 102,
                max_len: int | None = None, length_penalty: float = 1.0) -> list[list[int]]:  # fmt: skip
    """Beam search per memory row (B, N, D) → tokenizer ids; finished hypotheses are ranked by
    log-probability / length**length_penalty."""
    max_len = min(max_len or decoder.max_len, decoder.max_len)
    bos_c, eos_c = decoder.to_compact(torch.tensor([bos, eos])).tolist()
    out = []
    for b in range(memory.shape[0]):
        mem = memory[b : b + 1]
        alive = [([bos_c], 0.0)]
        finished: list[tuple[list[int], float]] = []
        for _ in range(max_len - 1):
            ids = torch.tensor([s for s, _ in alive], device=memory.device)
            index = torch.zeros(len(alive), dtype=torch.long, device=memory.device)
            logp = decoder(ids, mem, None, index)[:, -1].float().log_softmax(-1)  # (A, V)
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


def rebuild(backbone, spec: dict) -> FusionModel:
    """The FusionModel a run saved (`load_run` calls this with the spec's `fusion` entry)."""
    return FusionModel(backbone, spec)


def save_fusion_spec(model: FusionModel, processor, folder) -> None:
    """The backbone's spec plus the fusion model's, so `load_run` rebuilds the whole model."""
    from mmtune.models.load import save_spec

    extra = {"wrap": {"builder": "mmtune.models.fusion:rebuild", "spec": model.spec()}}
    save_spec(model.backbone, processor, folder, extra=extra)


# ---------------------------------------------------------------- presets


def _conv_stem_classes():
    """A vision tower for small synthetic scenes: the RN paper's 4 strided 3×3 conv layers (75 →
    5×5 feature map), whose cells become tokens for a few transformer blocks. A ViT learns where
    things are only slowly from scratch (measured: ~300 steps before "is red on the left" moves,
    against ~30 for the conv stem), so scenes like `shapes` get this one. Registered with
    transformers' Auto classes so a run folder rebuilds it from its config.json."""
    from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutput

    class ConvStemConfig(PretrainedConfig):
        model_type = "mmtune-convstem"

        def __init__(self, image_size=75, channels=24, stem_layers=4, hidden_size=128,
                     num_hidden_layers=2, num_attention_heads=4, pos_scale=0.5, **kw):  # fmt: skip
            super().__init__(**kw)
            self.image_size, self.channels, self.stem_layers = image_size, channels, stem_layers
            self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
            self.num_attention_heads, self.pos_scale = num_attention_heads, pos_scale

    class ConvStemModel(PreTrainedModel):
        config_class = ConvStemConfig
        base_model_prefix = "convstem"
        main_input_name = "pixel_values"

        def __init__(self, config):
            super().__init__(config)
            c, layers, size = config.channels, [], config.image_size
            for i in range(config.stem_layers):  # input: RGB + (x, y) coordinates (CoordConv)
                layers += [nn.Conv2d(5 if i == 0 else c, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU()]
                size = (size + 1) // 2
            self.stem = nn.Sequential(*layers)
            d = config.hidden_size
            self.proj = nn.Linear(c, d)
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
            # initial loudness of the position term: 0.5 ≈ as loud as content; quieter (0.05) lets
            # cross-attention keys say what a cell holds ("red") before where it is
            self.pos = nn.Parameter(torch.randn(1, size * size + 1, d) * config.pos_scale)
            self.blocks = nn.ModuleList(
                Block(d, config.num_attention_heads, cross=False)
                for _ in range(config.num_hidden_layers)
            )
            self.ln = nn.LayerNorm(d)
            self.post_init()

        def _init_weights(self, module):
            pass  # PyTorch's default initialisation of each layer

        def forward(self, pixel_values, **kwargs):
            """(B, 3, S, S) → last_hidden_state (B, 1 + h·w, D): [CLS] then the stem's cells."""
            b, _, h, w = pixel_values.shape
            ys, xs = torch.meshgrid(
                torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij"
            )
            coords = torch.stack([xs, ys]).to(pixel_values).expand(b, 2, h, w)
            # where a thing is must reach the tokens as loudly as what it is: the relational
            # questions are about positions
            x = (
                self.stem(torch.cat([pixel_values, coords], 1)).flatten(2).transpose(1, 2)
            )  # (B, h·w, C)
            x = torch.cat([self.cls.expand(len(x), -1, -1), self.proj(x)], dim=1) + self.pos
            for blk in self.blocks:
                x = blk(x)
            return BaseModelOutput(last_hidden_state=self.ln(x))

    AutoConfig.register("mmtune-convstem", ConvStemConfig, exist_ok=True)
    AutoModel.register(ConvStemConfig, ConvStemModel, exist_ok=True)
    return ConvStemConfig, ConvStemModel


ConvStemConfig, ConvStemModel = _conv_stem_classes()


def shapes_fusion_preset(image_size: int = 75, dim: int = 128, vision_layers: int = 2,
                         text_layers: int = 2, pos_scale: float = 0.5,
                         text_pos_scale: float = 1.0):  # fmt: skip
    """Conv-stem vision tower (5×5 tokens for 75×75 scenes) + a small BERT on the MiniLM
    word-piece vocabulary, both random; → (DualEncoder, Processor, defaults). With
    `vision_layers=0` the tokens are the stem's cells themselves and the image embedding is their
    mean; with `text_layers=0` the text tokens are BERT's embeddings (word + position).
    `text_pos_scale` < 1 starts BERT's position embeddings quieter than its word embeddings and
    its (constant) token-type embedding at zero, so a token starts out mostly saying its word."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mmtune.models.load import Processor, minilm_dir

    vision = ConvStemModel(ConvStemConfig(image_size=image_size, hidden_size=dim,
                                          num_hidden_layers=vision_layers, pos_scale=pos_scale))  # fmt: skip
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tcfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=dim, num_hidden_layers=text_layers,
                      num_attention_heads=4, intermediate_size=4 * dim, max_position_embeddings=128,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    tcfg._attn_implementation = "eager"  # 2× faster than the fused CPU kernels at this size
    text = BertModel(tcfg, add_pooling_layer=False)
    if text_pos_scale != 1.0:
        with torch.no_grad():
            text.embeddings.position_embeddings.weight.mul_(text_pos_scale)
            text.embeddings.token_type_embeddings.weight.zero_()
    pooling = "cls" if vision_layers else "mean"  # without blocks, [CLS] would see nothing
    model = DualEncoder(vision, text, dim, dim, dim, vision_pooling=pooling, text_pooling="mean")
    return model, Processor(tok, image_size, max_length=128), {"lock_text": False}


def shapes_cells_preset():
    """`shapes-cells`: the conv stem's cells are the image tokens (no vision blocks, position
    term at 0.05) and word embeddings the text tokens (no text layers): the fusion encoder's
    cross-attention reads cells that still say plainly what colour they hold, which is what lets a
    question's colour word find its object quickly (docs/vqa.md)."""
    return shapes_fusion_preset(vision_layers=0, text_layers=0, pos_scale=0.05, text_pos_scale=0.5)


FUSION_PRESETS = {"shapes-fusion": shapes_fusion_preset, "shapes-cells": shapes_cells_preset}


def build_vocab(tokenizer, texts: list[str],
                specials: tuple[str, ...] = ("pad", "unk", "cls", "sep", "mask")) -> list[int]:  # fmt: skip
    """Compact decoder vocabulary: the `specials` ([PAD], [UNK], [CLS], [SEP], [MASK]), then every
    tokenizer id the texts use (sorted) — a softmax over tens of ids, not the tokenizer's 30k."""
    special = [getattr(tokenizer, f"{name}_token_id") for name in specials]
    special = [i for i in special if i is not None]
    seen = set()
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        seen.update(ids)
    return special + sorted(seen - set(special))
