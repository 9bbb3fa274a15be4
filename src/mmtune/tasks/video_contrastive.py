"""Contrastive video–text fine-tuning: frames through the image tower, pooled over time
(`middle`, `mean`, `transformer`); video↔text retrieval and zero-shot video classification."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import DataLoader

from mmtune.data.formats import Record
from mmtune.data.prompts import check_templates_option, head_prompts, prompt_record
from mmtune.data.video import FrameCache, clip_dataset
from mmtune.distributed import clip_loss_rows, is_distributed, siglip_loss_rows
from mmtune.errors import ConfigError, UserError
from mmtune.losses import caption_group_ids
from mmtune.metrics import class_tables, classification_metrics, retrieval_metrics
from mmtune.models.temporal import TemporalPool
from mmtune.tasks.base import Evaluation, Task
from mmtune.tasks.contrastive import (
    caption_groups,
    caption_hash_ids,
    embed_texts,
    repeated_captions,
    zeroshot_classifier,
)

log = logging.getLogger("mmtune.video")


class VideoContrastiveOptions(BaseModel):
    """`options:` of the video-contrastive task."""

    model_config = ConfigDict(extra="forbid")
    loss: Literal["clip", "siglip"] = Field("clip", description="Contrastive loss.")
    pooling: Literal["middle", "mean", "transformer"] = Field(
        "transformer",
        description="Temporal pooling of the frame embeddings: the middle frame alone, their masked mean, or a "
        "small temporal transformer with frame positions (initialised to give the mean).",
    )
    temporal_layers: int = Field(2, gt=0, description="Blocks of the temporal transformer.")
    temporal_heads: int = Field(
        4, gt=0, description="Attention heads of the temporal transformer (divide the embedding size)."
    )
    class_aware: bool | Literal["auto"] = Field(
        "auto",
        description="Clips with the same caption are positives, not negatives. `auto`: on when captions repeat "
        "across the training split's clips.",
    )
    gather_features: bool = Field(True, description="With several processes, the loss over the global batch.")
    zeroshot: bool = Field(True, description="Evaluate zero-shot video classification (needs labels).")
    retrieval: bool = Field(True, description="Evaluate video↔text retrieval (R@1/5/10, median rank).")
    templates: str | list[str] = Field(
        "eval", description="Prompt templates for zero-shot classification, as in the contrastive task."
    )

    @field_validator("templates")
    @classmethod
    def _check_templates(cls, value):
        return check_templates_option(value)


def collate_clips(items: list[dict | None], processor) -> dict:
    """Items of VideoTextDataset → {pixel_values (B,T,3,S,S), frame_mask (B,T), input_ids,
    attention_mask, labels, captions}; {} when every clip was bad."""
    items = [it for it in items if it is not None]
    if not items:
        return {}
    batch = {
        "pixel_values": torch.from_numpy(np.stack([it["pixel_values"] for it in items])),
        "frame_mask": torch.from_numpy(np.stack([it["frame_mask"] for it in items])),
    }
    batch.update(processor.tokenize([it["caption"] for it in items]))
    batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    batch["captions"] = [it["caption"] for it in items]
    return batch


class VideoContrastiveTask(Task):
    """Train a dual encoder so a clip's pooled frames score higher with its caption than the rest."""

    name = "video-contrastive"
    Options = VideoContrastiveOptions
    metric, higher_is_better = "retrieval.t2v.R@1", True
    pairwise_loss = True
    routes = ("embed", "video")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.record: dict = {}
        self._class_aware: bool | None = None
        d = self.cfg.data
        self.cache = FrameCache(d.video_cache_mb * 2**20)  # shared by the splits' datasets

    # ------------------------------------------------------------ the model's life

    def build(self):
        from mmtune.models import load_model

        model, self.processor = load_model(self.cfg.model)
        if self.opts.loss == "siglip" and model.logit_bias is None:
            if getattr(type(model), "add_logit_bias", None) is None:
                raise UserError(f"options.loss=siglip needs a logit bias, which {self.cfg.model.name} lacks")
            model.add_logit_bias()
        if model.temporal is None:  # a video run brings its own; any other model gets one here
            model.set_temporal(self._temporal(model))
        return self._check_frames(model)

    def _check_frames(self, model):
        pool = model.temporal
        if pool.kind == "transformer" and self.cfg.data.frames > pool.max_frames:
            raise ConfigError(
                f"data.frames={self.cfg.data.frames}: this model's temporal transformer has positions for "
                f"{pool.max_frames} frames (set data.frames to at most {pool.max_frames})"
            )
        return model

    def _temporal(self, model) -> TemporalPool:
        size = self.processor.image_size
        with torch.no_grad():
            dim = model.eval().encode_image(torch.zeros(1, 3, size, size)).shape[-1]
        model.train()
        o = self.opts
        try:
            return TemporalPool(o.pooling, dim, self.cfg.data.frames, o.temporal_layers, o.temporal_heads)
        except ValueError as e:
            raise ConfigError(f"options.temporal_heads: {e}") from None

    def save(self, model, folder: Path) -> None:
        from mmtune.models.load import save_spec

        extra = {"temporal": model.temporal.spec()}
        classes, templates = self._prompts()
        if classes:
            extra["zeroshot"] = prompt_record(classes, templates, self.opts.templates, self.cfg.data.classnames)
        save_spec(model, self.processor, folder, extra=extra)

    def load(self, folder: Path):
        from mmtune.models.load import build_from_spec

        model, self.processor, spec = build_from_spec(folder)
        model.set_temporal(TemporalPool(**spec["temporal"]))
        self.record = dict(spec.get("zeroshot") or {})
        return self._check_frames(model)

    # ------------------------------------------------------------ data

    def dataset(self, records, train: bool):
        return clip_dataset(self.cfg, self.processor, records, train, self.cache)

    def clip_item(self, path: str | Path, max_seconds: float | None = None) -> dict | None:
        """One video file → its item as evaluation samples it (pixel_values, frame_mask), decoded
        afresh (no cache) and refused beyond `max_seconds` (at most data.max_video_seconds); None
        when it does not decode."""
        return clip_dataset(self.cfg, self.processor, [Record(image=str(path))], False, FrameCache(0), max_seconds)[0]

    def collate(self, items):
        return collate_clips(items, self.processor)

    # ------------------------------------------------------------ training

    def loss(self, model, batch) -> dict:
        o = self.opts
        groups = self._group_ids(batch)
        vid = model.encode_video(batch["pixel_values"], batch["frame_mask"]).float()
        txt = model.encode_text(batch["input_ids"], batch["attention_mask"]).float()
        scale = model.scale()
        if o.loss == "siglip":
            loss = siglip_loss_rows(vid, txt, scale, model.logit_bias, groups, slice(None), o.gather_features)
        else:
            loss = clip_loss_rows(vid, txt, scale, groups, slice(None), o.gather_features)
        return {"loss": loss, "samples": len(vid), "logit_scale": scale.detach()}

    def _group_ids(self, batch) -> torch.Tensor | None:
        """Clips with equal captions are positives of each other (when class-aware)."""
        if self._class_aware is None:
            aware = self.opts.class_aware
            if aware == "auto":
                shared, distinct = repeated_captions(self.ctx.splits.train if self.ctx.splits else [])
                aware = shared > 0
                if shared:
                    log.info(
                        "options.class_aware on (auto): %d of %d training captions describe several clips",
                        shared,
                        distinct,
                    )
            self._class_aware = bool(aware)
        if not self._class_aware:
            return None
        gathered = is_distributed() and self.opts.gather_features
        groups = caption_hash_ids(batch["captions"]) if gathered else caption_group_ids(batch["captions"])
        return groups.to(batch["pixel_values"].device)

    # ------------------------------------------------------------ evaluation

    def _prompts(self) -> tuple[list[str] | None, list[str]]:
        return head_prompts(self.opts.templates, self.cfg.data.classnames, self.ctx.splits, self.record)

    def class_prompts(self) -> tuple[list[str], list[str]] | None:
        classes, templates = self._prompts()
        return (classes, templates) if classes else None

    @torch.no_grad()
    def embed_videos(self, model, records) -> torch.Tensor:
        """Normalised clip embeddings (N, D), in order, frames sampled as for evaluation."""
        loader = DataLoader(
            self.dataset(records, train=False), batch_size=self.cfg.data.eval_batch_size, collate_fn=lambda x: x
        )
        out = []
        for items in loader:
            if any(it is None for it in items):
                raise ValueError("a bad video reached evaluation; screen records first")
            batch = collate_clips(items, self.processor)
            with self.ctx.autocast():
                px, mask = batch["pixel_values"].to(self.ctx.device), batch["frame_mask"].to(self.ctx.device)
                out.append(model.encode_video(px, mask).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)

    def evaluate(self, model, records) -> Evaluation:
        ctx, o, proc = self.ctx, self.opts, self.processor
        vid = self.embed_videos(model, records)
        metrics: dict[str, float] = {}
        tables: dict[str, dict] = {}
        rows = [i for i, r in enumerate(records) if r.label is not None]
        classes, templates = self._prompts()
        if o.zeroshot and classes and rows:
            w = zeroshot_classifier(model, classes, templates, ctx, proc)
            labels = torch.tensor([records[i].label for i in rows])
            scores = vid[rows] @ w.T
            metrics.update({f"zeroshot.{k}": v for k, v in classification_metrics(scores, labels).items()})
            tables.update(class_tables(classes, scores.argmax(1), labels, "zeroshot", "Zero-shot (video)"))
        if o.retrieval and any(r.captions for r in records):
            texts, text_groups, clip_groups = caption_groups(records)
            txt = embed_texts(model, texts, ctx, proc)
            rt = retrieval_metrics(vid, txt, text_groups, image_groups=clip_groups, median_rank=True)
            names = {"i2t": "v2t", "t2i": "t2v"}
            metrics.update({f"retrieval.{names[k[:3]]}{k[3:]}": v for k, v in rt.items()})
        return Evaluation(metrics, tables=tables)
