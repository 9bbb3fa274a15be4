"""open_clip's own model code as a test reference, loaded without its package `__init__`.

open_clip's `__init__` imports its image transforms, which need torchvision; torchvision from
PyPI does not import beside the CPU build of torch. `open_clip/model.py` and `transformer.py`
need torch alone, except `utils.py`, which imports `torchvision.ops.misc.FrozenBatchNorm2d` for
freezing ResNet batch norms (never used by a ViT). So this module registers a bare `open_clip`
package (its real folder, no `__init__` run) and a stand-in `torchvision.ops.misc` holding only
that name, then imports `open_clip.model` and `open_clip.tokenizer` as they ship.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  -- imported before the stand-in so it sees no torchvision


def _stand_in_torchvision() -> list[str]:
    """Register the stand-in modules that are not there yet; their names."""
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    added = []
    for name, module in (
        ("torchvision", types.ModuleType("torchvision")),
        ("torchvision.ops", types.ModuleType("torchvision.ops")),
        ("torchvision.ops.misc", misc),
    ):
        if name not in sys.modules:
            sys.modules[name] = module
            added.append(name)
    return added


def open_clip_modules():
    """(open_clip.model, open_clip.tokenizer), or skip the test when open_clip is absent."""
    if "open_clip.model" not in sys.modules:
        spec = importlib.util.find_spec("open_clip")
        if spec is None:
            pytest.skip("open-clip-torch not installed (pip install open-clip-torch --no-deps)")
        pkg = types.ModuleType("open_clip")
        pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules.setdefault("open_clip", pkg)
        added = _stand_in_torchvision()
        try:
            import open_clip.model
            import open_clip.tokenizer  # noqa: F401
        finally:
            # gone again once imported: other libraries probe for torchvision by its spec
            for name in added:
                del sys.modules[name]
    return sys.modules["open_clip.model"], sys.modules["open_clip.tokenizer"]


def shipped_config(name: str, max_layers: int | None = 2, **text) -> dict:
    """One of open_clip's shipped model configs, depth cut to `max_layers` (widths, heads,
    patch and image sizes kept), text_cfg fields overridden by `text`."""
    model, _ = open_clip_modules()
    cfg = json.loads((Path(model.__file__).parent / "model_configs" / f"{name}.json").read_text())
    cfg = copy.deepcopy(cfg)
    if max_layers:
        for tower in ("vision_cfg", "text_cfg"):
            cfg[tower]["layers"] = min(cfg[tower]["layers"], max_layers)
    cfg["text_cfg"].update(text)
    return cfg


def save_open_clip(cfg: dict, folder: Path, seed: int = 0, preprocess: dict | None = None):
    """Build open_clip's CLIP from `cfg` with random weights; save it as an open_clip folder."""
    from safetensors.torch import save_file

    model_mod, _ = open_clip_modules()
    torch.manual_seed(seed)
    model = model_mod.CLIP(**cfg).eval()
    with torch.no_grad():  # move every weight off its init (LayerNorms start at 1/0, scale at ln 1/0.07)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.logit_scale.fill_(3.3)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": cfg, "preprocess_cfg": preprocess or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model


def load_open_clip_ref(folder: Path):
    """open_clip's CLIP built from an open_clip folder, the way open_clip loads it."""
    from safetensors.torch import load_file

    model_mod, _ = open_clip_modules()
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    model = model_mod.CLIP(**cfg).eval()
    model.load_state_dict(load_file(str(folder / "open_clip_model.safetensors")))
    return model
