"""Freezing by tower, by top-k blocks and by name pattern; parameter counts."""

from __future__ import annotations

import fnmatch

from torch import nn

from mmtune.errors import ConfigError
from mmtune.models.dual import tower_blocks


def freeze_tower(model, name: str, unfreeze_top_k: int | None = None) -> None:
    """Freeze a tower ('vision' or 'text'), optionally keeping its last k blocks trainable."""
    tower = model.tower(name)
    for p in tower.parameters():
        p.requires_grad_(False)
    if unfreeze_top_k:
        blocks = tower_blocks(tower)
        if unfreeze_top_k > len(blocks):
            raise ConfigError(f"model.unfreeze_top_k={unfreeze_top_k} but the {name} tower has {len(blocks)} blocks")
        for block in blocks[len(blocks) - unfreeze_top_k :]:
            for p in block.parameters():
                p.requires_grad_(True)


def freeze_patterns(model: nn.Module, patterns: list[str]) -> int:
    """Freeze parameters whose name matches any fnmatch pattern; error when one matches nothing."""
    frozen = 0
    for pat in patterns:
        hits = [p for n, p in model.named_parameters() if fnmatch.fnmatch(n, pat)]
        if not hits:
            raise ConfigError(f"model.freeze pattern {pat!r} matches no parameter name")
        for p in hits:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def apply_freezing(model, model_cfg, preset_defaults: dict | None = None) -> None:
    """Apply the config's locking/freezing switches in a fixed order."""
    lock_text = model_cfg.lock_text
    if lock_text is None:
        lock_text = (preset_defaults or {}).get("lock_text", False)
    if lock_text and model_cfg.unfreeze_top_k:
        model.lock_text(False)
        freeze_tower(model, "text", model_cfg.unfreeze_top_k)
    else:
        model.lock_text(bool(lock_text))
    if model_cfg.lock_image:
        freeze_tower(model, "vision", None if lock_text else model_cfg.unfreeze_top_k)
    freeze_patterns(model, model_cfg.freeze)
