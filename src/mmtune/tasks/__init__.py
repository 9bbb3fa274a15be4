"""Tasks: the unit of extension, registered by name (the contract is in `mmtune.tasks.base`)."""

from __future__ import annotations

import importlib

from mmtune.errors import ConfigError
from mmtune.tasks.base import Context, Evaluation, NoOptions, Task, TrainStep, selection_metric

__all__ = [
    "Context",
    "Evaluation",
    "NoOptions",
    "Task",
    "TrainStep",
    "get_task",
    "register",
    "selection_metric",
    "task_names",
]

_REGISTRY: dict[str, str] = {
    "contrastive": "mmtune.tasks.contrastive:ContrastiveTask",
    "classify": "mmtune.tasks.classify:ClassifyTask",
    "vqa": "mmtune.tasks.vqa:VQATask",
    "caption": "mmtune.tasks.caption:CaptionTask",
    "pretrain-fusion": "mmtune.tasks.pretrain_fusion:PretrainFusionTask",
    "vq-autoencoder": "mmtune.tasks.vq_autoencoder:VQAutoencoderTask",
    "text2image": "mmtune.tasks.text2image:Text2ImageTask",
    "sd-lora": "mmtune.tasks.sd_lora:SDLoRATask",
    "vlm-sft": "mmtune.tasks.vlm_sft:VLMSFTTask",
    "video-contrastive": "mmtune.tasks.video_contrastive:VideoContrastiveTask",
    "video-caption": "mmtune.tasks.video_caption:VideoCaptionTask",
}


def register(name: str, target: str) -> None:
    """Register `module:Class` (a `Task` subclass) under a task name."""
    _REGISTRY[name] = target


def _plugins() -> None:
    """Tasks other packages declare under the `mmtune.tasks` entry-point group."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="mmtune.tasks"):
        _REGISTRY.setdefault(ep.name, ep.value)


def task_names() -> list[str]:
    _plugins()
    return sorted(_REGISTRY)


def get_task(name: str) -> type[Task]:
    """The task class registered under `name` (or declared by a package's entry point)."""
    if name not in _REGISTRY:
        _plugins()
    if name not in _REGISTRY:
        raise ConfigError(f"config key 'task': unknown task {name!r} (tasks: {task_names()})")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def infer_legacy_task(spec: dict) -> str:
    """The task that wrote a model spec of an mmtune from before runs named their task."""
    wrap = (spec.get("wrap") or {}).get("builder", "")
    heads = set(((spec.get("wrap") or {}).get("spec") or {}).get("heads_spec", {}))
    if spec.get("kind") == "sd-lora":
        return "sd-lora"
    if "classify" in spec:
        return "classify"
    if wrap.endswith("vq:rebuild"):
        return "vq-autoencoder"
    if wrap.endswith("prior:rebuild"):
        return "text2image"
    for head, task in (("vqa", "vqa"), ("answer", "vqa"), ("caption", "caption"), ("itm", "pretrain-fusion")):
        if head in heads:
            return task
    return "contrastive"
