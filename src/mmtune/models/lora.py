"""LoRA adapters (through peft) on a model's image tower; merge them back for export."""

from __future__ import annotations

import fnmatch

from torch import nn

from mmtune.errors import ConfigError


def linear_names(root: nn.Module, under: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Full names (within `root`) of the nn.Linear layers inside `under`, optionally filtered.

    `patterns` are fnmatch patterns on the name relative to `under` (e.g. `*attention*`).
    """
    inside = {id(m) for m in under.modules()}
    prefix = next(name for name, m in root.named_modules() if m is under)
    names = []
    for name, mod in root.named_modules():
        if id(mod) not in inside or not isinstance(mod, nn.Linear):
            continue
        rel = name[len(prefix) + 1 :] if prefix else name
        if not patterns or any(fnmatch.fnmatch(rel, p) for p in patterns):
            names.append(name)
    return names


def add_lora(
    root: nn.Module,
    tower: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: list[str] | None = None,
) -> list[str]:
    """Inject LoRA adapters in place into the linear layers of `tower` (a sub-module of `root`).

    Only the adapters become trainable inside `root`; the caller re-enables anything else it
    trains (a classification head). Returns the adapted layer names (relative to `root`), which
    `load` must be given again to rebuild the same structure.
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = linear_names(root, tower, targets)
    if not names:
        raise ConfigError(
            f"LoRA: no linear layer of the image tower matches {targets}; "
            "layer names look like encoder.layer.0.attention.attention.query"
        )
    # Exact full names: peft matches a target by suffix, and `^…$` keeps text layers out.
    pattern = "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
    inject_adapter_in_model(config, root)
    return names


def has_lora(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def merge_lora(root: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight (W += B·A·α/r) and put the base layer back.

    The result has the original architecture and parameter names, so it saves, loads and
    exports like a model that never had adapters. Works in place; returns `root`.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer  # LoRA's layers, and any other adapter

    for name, mod in list(root.named_modules()):
        if not isinstance(mod, BaseTunerLayer):
            continue
        mod.merge()
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, mod.get_base_layer())
    return root
