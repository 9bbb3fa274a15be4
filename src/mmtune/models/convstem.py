"""A vision tower for small synthetic scenes: the RN paper's 4 strided 3×3 conv layers (75 →
5×5 feature map), whose cells become tokens for a few transformer blocks.

A ViT learns where things are only slowly from scratch (measured: ~300 steps before "is red on
the left" moves, against ~30 for the conv stem), so scenes like `shapes` get this one. `register()`
makes transformers' Auto classes rebuild it from a run folder's config.json.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from mmtune.models.attention import Block


class ConvStemConfig(PretrainedConfig):
    model_type = "mmtune-convstem"

    def __init__(
        self,
        image_size=75,
        channels=24,
        stem_layers=4,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        pos_scale=0.5,
        **kw,
    ):
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
            Block(d, config.num_attention_heads, cross=False) for _ in range(config.num_hidden_layers)
        )
        self.ln = nn.LayerNorm(d)
        self.post_init()

    def _init_weights(self, module):
        pass  # PyTorch's default initialisation of each layer

    def forward(self, pixel_values, **kwargs):
        """(B, 3, S, S) → last_hidden_state (B, 1 + h·w, D): [CLS] then the stem's cells."""
        b, _, h, w = pixel_values.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        coords = torch.stack([xs, ys]).to(pixel_values).expand(b, 2, h, w)
        # where a thing is must reach the tokens as loudly as what it is: the relational
        # questions are about positions
        x = self.stem(torch.cat([pixel_values, coords], 1)).flatten(2).transpose(1, 2)  # (B, h·w, C)
        x = torch.cat([self.cls.expand(len(x), -1, -1), self.proj(x)], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return BaseModelOutput(last_hidden_state=self.ln(x))


def register() -> None:
    """Let `AutoConfig` / `AutoModel` build the tower from a saved config (idempotent)."""
    AutoConfig.register(ConvStemConfig.model_type, ConvStemConfig, exist_ok=True)
    AutoModel.register(ConvStemConfig, ConvStemModel, exist_ok=True)
