"""Built-in presets for the `shapes` scenes: the conv-stem vision tower + a small BERT."""

from __future__ import annotations

import torch

from mmtune.models.convstem import ConvStemConfig, ConvStemModel
from mmtune.models.dual import DualEncoder


def shapes_fusion_preset(
    image_size: int = 75,
    dim: int = 128,
    vision_layers: int = 2,
    text_layers: int = 2,
    pos_scale: float = 0.5,
    text_pos_scale: float = 1.0,
):
    """Conv-stem vision tower (5×5 tokens for 75×75 scenes) + a small BERT on the MiniLM
    word-piece vocabulary, both random; → (DualEncoder, Processor, defaults). With
    `vision_layers=0` the tokens are the stem's cells themselves and the image embedding is their
    mean; with `text_layers=0` the text tokens are BERT's embeddings (word + position).
    `text_pos_scale` < 1 starts BERT's position embeddings quieter than its word embeddings and
    its (constant) token-type embedding at zero, so a token starts out mostly saying its word."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mmtune.models.load import Processor, minilm_dir

    vision = ConvStemModel(
        ConvStemConfig(image_size=image_size, hidden_size=dim, num_hidden_layers=vision_layers, pos_scale=pos_scale)
    )
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tcfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=dim,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        intermediate_size=4 * dim,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
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
