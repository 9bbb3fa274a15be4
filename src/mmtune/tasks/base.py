"""The task contract: what a task declares, what it owns, and the defaults of its optional members.

A task owns its model's whole life — the program (engine, CLI, server, export) never asks what
kind of model it holds:

- declares `name`, `Options` (a pydantic model for `options:`), `metric` (the validation figure
  that picks `checkpoints/best/`) and `higher_is_better`, `routes` (what `mmtune serve` offers)
  and `exports` (the formats `mmtune export` writes);
- `build()` — the model to train, from `cfg.model` (a preset, a checkpoint or a run);
  `save(model, folder)` writes what rebuilds its architecture (no weights) and `load(folder)`
  rebuilds it; `build` and `load` set `self.processor` (images and text → model inputs);
- `dataset(records, train)` / `collate(items)` — batches with transformers' key names;
- `loss(model, batch)` — `{"loss": total, "samples": n, …scalars to log}`; the engine trains
  `TrainStep(task, model)`, one module whose `forward(batch)` is this, so DDP/FSDP wrap it whole;
- `evaluate(model, records)` — an `Evaluation`: metrics from pure functions, plus tables and
  images the program writes into the run folder (a task never writes files);
- `predict(model, inputs)` — shared by `mmtune predict`, `eval` and the server.
"""

from __future__ import annotations

import abc
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from mmtune.config import Config, validate_options
from mmtune.errors import UserError


@dataclass(frozen=True)
class Context:
    """What a task needs besides its model: the config, the data splits and the device."""

    cfg: Config
    splits: Any = None  # mmtune.data.Splits, or None where no data was read (serving, export)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def classes(self) -> list[str] | None:
        return None if self.splits is None else self.splits.classes

    def autocast(self):
        """The run's mixed precision as a context manager (a no-op in fp32)."""
        from mmtune.precision import effective_precision

        precision = effective_precision(self.cfg.train.precision, self.device.type)
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


@dataclass
class Evaluation:
    """What `evaluate` returns: flat metrics, plus artifacts the program writes into the run."""

    metrics: dict[str, float]
    tables: dict[str, dict] = field(default_factory=dict)  # NAME → {title, columns, rows}
    images: dict[str, Any] = field(default_factory=dict)  # NAME → PIL image (plots/NAME.png)
    # NAME → mmtune.examples.Examples: rows with thumbnails (examples/NAME.json, examples/NAME/)
    examples: dict[str, Any] = field(default_factory=dict)


class NoOptions(BaseModel):
    """A task without options: any `options.*` key is an error."""

    model_config = ConfigDict(extra="forbid")


class Task(abc.ABC):
    """Base of every task: the required members are abstract, the optional ones default here."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    metric: ClassVar[str] = "val.loss"  # default selection metric (on the validation split)
    higher_is_better: ClassVar[bool] = False
    routes: ClassVar[tuple[str, ...]] = ()  # "embed" (encode_image/encode_text), "video", "predict", "chat"
    exports: ClassVar[tuple[str, ...]] = ()  # formats of `mmtune export`: "hf", "onnx"
    syncs_own_gradients: bool = False  # True: the engine must not wrap the model in DDP
    pairwise_loss: bool = False  # the loss compares every pair of a batch: memory grows as B²

    def __init__(self, ctx: Context):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.opts = validate_options(ctx.cfg, self.Options)
        self.processor = None  # set by build() / load()

    # ------------------------------------------------------------ the model's life

    @abc.abstractmethod
    def build(self) -> nn.Module:
        """The model to train, from `cfg.model`; sets `self.processor`."""

    @abc.abstractmethod
    def save(self, model: nn.Module, folder: Path) -> None:
        """Write what rebuilds the architecture (configs, tokenizer, preprocessing) — no weights."""

    @abc.abstractmethod
    def load(self, folder: Path) -> nn.Module:
        """The architecture saved by `save`, randomly initialised; sets `self.processor`."""

    def load_weights(self, model: nn.Module, path: Path) -> None:
        """Load a checkpoint's `model.safetensors` into `model` (strict by default)."""
        from mmtune.models.load import load_weights

        load_weights(model, path)

    # ------------------------------------------------------------ data

    @abc.abstractmethod
    def dataset(self, records: list, train: bool) -> torch.utils.data.Dataset:
        """Items for `collate` (training augmentation when `train`)."""

    @abc.abstractmethod
    def collate(self, items: list) -> dict:
        """A batch with transformers' key names; {} when every item was bad."""

    def count(self, records: list) -> int:
        """A split's size in the task's units (`data.train/val/test`): records by default."""
        return len(records)

    # ------------------------------------------------------------ training

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: dict) -> dict:
        """{"loss": total, "samples": batch size, …detached scalars to log} — under autocast."""

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        """Learning-rate multipliers by parameter name (e.g. layer-wise decay); none by default."""
        return {}

    # ------------------------------------------------------------ evaluation and use

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, records: list) -> Evaluation:
        """Metrics on `records` (+ tables, images and examples for the report)."""

    def predict(self, model: nn.Module, inputs: list[dict]) -> list[dict]:
        """Outputs for user inputs (`mmtune predict`, the server); not every task has them."""
        raise UserError(f"task {self.name} makes no predictions")

    def predict_inputs(self, records: list) -> list[dict]:
        """Inputs for `predict` made from data records (what the contract test and examples use);
        none for a task without predictions."""
        return []

    def class_prompts(self) -> tuple[list[str], list[str]] | None:
        """(class names, prompt templates) of the model's zero-shot classifier as the run recorded
        them — what the server's `/v1/classify` uses when a request names no labels; none here."""
        return None

    def format_prediction(self, output: dict) -> str:
        """One prediction as `mmtune predict` prints it (JSON by default)."""
        return json.dumps(output)

    def generate(self, model: nn.Module, prompts: list[str], n: int, seed: int, settings: dict) -> list[list]:
        """`n` PIL images per prompt (`mmtune generate`); `settings` overrides sampling options
        (`guidance`, `temperature`, `top_k`, `steps`; None keeps the run's)."""
        raise UserError(f"task {self.name} does not generate images (text2image and sd-lora do)")

    def chat(self, model: nn.Module, messages: list[dict], images: list, settings: dict) -> dict:
        """The assistant's next turn (`mmtune chat`, `POST /v1/chat/completions`; tasks routing
        "chat"): `messages` [{"role": "system"|"user"|"assistant", "content": text with one `<image>`
        mark per image}] ending with the user's, `images` PIL images in mark order, `settings`
        {"max_new_tokens", "temperature" (0: greedy), "seed", "max_time"} (None keeps the run's) →
        {"text", "prompt_tokens", "completion_tokens", "finish_reason": "stop" | "length"}."""
        raise UserError(f"task {self.name} does not chat (vlm-sft runs do)")

    def default_reranker(self) -> str | None:
        """The dual-encoder run that re-ranks generated candidates unless told otherwise."""
        return None


class TrainStep(nn.Module):
    """The module the engine trains: `forward(batch)` is the task's loss on its model."""

    def __init__(self, task: Task, model: nn.Module):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict) -> dict:
        return self.task.loss(self.model, batch)


def selection_metric(cfg: Config, task_cls: type[Task] | Task) -> tuple[str, bool]:
    """(metric name, higher is better) that picks `best`: `eval.metric` or the task's default."""
    name = cfg.eval.metric or task_cls.metric
    if cfg.eval.mode is not None:
        return name, cfg.eval.mode == "max"
    if name == task_cls.metric:
        return name, task_cls.higher_is_better
    return name, not name.endswith("loss")
