"""The fusion model family (ALBEF-style): a dual encoder + a fusion encoder + task heads.

`model.py` (FusionModel, its options and spec), `encoder.py` (the fusion encoder), `spatial.py`
(spatial cross-attention), `decoders.py` (answer/caption decoders, MLM head, decoding),
`presets.py` (the `shapes-fusion` / `shapes-cells` presets); attention lives in
`mmtune.models.attention`.
"""

from mmtune.models.fusion.decoders import (
    MLMHead,
    TextDecoder,
    beam_search,
    build_vocab,
    greedy_decode,
)
from mmtune.models.fusion.encoder import FusionEncoder
from mmtune.models.fusion.model import (
    FusionModel,
    FusionOptions,
    load_fusion_spec,
    save_fusion_spec,
    text_tokens,
    tower_dims,
    unique_rows,
)
from mmtune.models.fusion.presets import FUSION_PRESETS, shapes_cells_preset, shapes_fusion_preset
from mmtune.models.fusion.spatial import SpatialBlock, grid_positions

__all__ = [
    "FUSION_PRESETS",
    "FusionEncoder",
    "FusionModel",
    "FusionOptions",
    "MLMHead",
    "SpatialBlock",
    "TextDecoder",
    "beam_search",
    "build_vocab",
    "greedy_decode",
    "grid_positions",
    "load_fusion_spec",
    "save_fusion_spec",
    "shapes_cells_preset",
    "shapes_fusion_preset",
    "text_tokens",
    "tower_dims",
    "unique_rows",
]
