"""Tasks: the unit of extension, registered by name.

A task is a class built with a `Context`; the engine, CLI and server only call these members:

- `build_head(model) -> nn.Module` — the trainable module (the backbone itself, or with a head);
- `dataset(records, train) -> torch Dataset` — items for `collate`;
- `collate(items) -> dict` — a batch with transformers' key names;
- `loss(model, batch) -> dict[str, Tensor]` — named parts, `"loss"` is the total;
- `evaluate(model, records) -> dict[str, float]` — pure metric functions from `mmtune.metrics`;
- `predict(model, inputs) -> list[dict]` — shared by `mmtune predict`, `eval` and the server;
- optional `count(records) -> int` — a split's size in the task's units for `data.train/val/test`
  (captioning counts images, not question records); `len` by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmtune.errors import ConfigError

_REGISTRY: dict[str, str] = {
    "contrastive": "mmtune.tasks.contrastive:ContrastiveTask",
    "classify": "mmtune.tasks.classify:ClassifyTask",
    "vqa": "mmtune.tasks.vqa:VQATask",
    "caption": "mmtune.tasks.caption:CaptionTask",
    "pretrain-fusion": "mmtune.tasks.pretrain_fusion:PretrainFusionTask",
    "vq-autoencoder": "mmtune.tasks.vq_autoencoder:VQAutoencoderTask",
    "text2image": "mmtune.tasks.text2image:Text2ImageTask",
    "sd-lora": "mmtune.tasks.sd_lora:SDLoRATask",
}


@dataclass
class Context:
    """What a task needs besides the model: config, processor, class names, templates, device."""

    cfg: Any
    processor: Any
    splits: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: Any = None  # a context-manager factory for mixed precision at evaluation

    @property
    def classes(self) -> list[str] | None:
        return None if self.splits is None else self.splits.classes


def register(name: str, target: str) -> None:
    """Register `module:Class` under a task name."""
    _REGISTRY[name] = target


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str):
    """The task class registered under `name`."""
    import importlib

    if name not in _REGISTRY:
        raise ConfigError(f"config key 'task': unknown task {name!r} (tasks: {task_names()})")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
