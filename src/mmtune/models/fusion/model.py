"""`FusionModel`: a dual encoder + the fusion encoder + named task heads (ALBEF-style).

The fusion encoder takes the dual encoder's text-token features, and each layer self-attends over
the text and cross-attends to the image patch tokens (`model.image_tokens`). Heads: an answer
classifier (`vqa`), a generative answer decoder (`answer`), a caption decoder cross-attending to
the patches (`caption`), image–text matching (`itm`) and masked language modelling (`mlm`).
Its `spec()` is saved beside the backbone's spec (`save_fusion_spec`), so a run's task rebuilds it.

Several questions about one image share its patch tokens: `image_index` (B_q,) maps each text row
to its image row, so the vision tower and the cross-attention keys/values run once per image.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field
from torch import nn

from mmtune.models.dual import DualEncoder
from mmtune.models.fusion.decoders import MLMHead, TextDecoder
from mmtune.models.fusion.encoder import FusionEncoder


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
        return {
            "dim": self.fusion_dim,
            "layers": self.fusion_layers,
            "heads": self.fusion_heads,
            "fusion": fusion,
            "spatial": self.spatial,
            "heads_spec": heads_spec,
        }


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
        return (backbone.vision_proj.in_features, backbone.text_proj.in_features, backbone.vision_proj.out_features)
    cfg = backbone.hf.config
    return cfg.vision_config.hidden_size, cfg.text_config.hidden_size, cfg.projection_dim


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.LayerNorm(d_hidden), nn.Linear(d_hidden, d_out))


class FusionModel(nn.Module):
    """Backbone (dual encoder) + fusion encoder + named heads, built from a plain-dict spec.

    spec: {dim, layers, heads, fusion: "cross-attention" | "concat", heads_spec: {name: {...}}}
    where a head spec is {"kind": "classifier", "answers": [...]} (answer classifier),
    {"kind": "decoder", "vocab_ids": [...], "layers": n, "max_len": n, "memory": "fusion"|"image"} (with
    "frames": n, video frames' tokens as memory),
    {"kind": "itm"} or {"kind": "mlm", "vocab_ids": [...]}.
    """

    def __init__(self, backbone, spec: dict):
        super().__init__()
        self.backbone, self._spec = backbone, {**spec, "heads_spec": dict(spec["heads_spec"])}
        img_dim, txt_dim, emb_dim = tower_dims(backbone)
        d, hd = spec["dim"], spec["heads"]
        self.fusion = None
        if spec["fusion"] == "cross-attention":
            self.fusion = FusionEncoder(txt_dim, img_dim, d, spec["layers"], hd, spatial=spec.get("spatial", False))
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
            return TextDecoder(hs["vocab_ids"], mem_dim, d, hs["layers"], hd, hs["max_len"], hs.get("frames", 0))
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
        self.head[name] = self._make_head(head_spec, self._spec["dim"], self._spec["heads"], img_dim, emb_dim).to(
            ref.device
        )
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


def save_fusion_spec(model: FusionModel, processor, folder) -> None:
    """The backbone's spec plus the fusion model's, so `load_run` rebuilds the whole model."""
    from mmtune.models.load import save_spec

    save_spec(model.backbone, processor, folder, extra={"fusion": model.spec()})


def load_fusion_spec(folder):
    """(FusionModel, processor) from a model folder written by `save_fusion_spec` (or by a run
    of an earlier version, which kept the fusion spec under `wrap`); weights not loaded."""
    from mmtune.models.load import build_from_spec

    backbone, processor, spec = build_from_spec(folder)
    fusion = spec.get("fusion") or spec["wrap"]["spec"]
    return FusionModel(backbone, fusion), processor
