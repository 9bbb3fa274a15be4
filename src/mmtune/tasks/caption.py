"""Image captioning: a transformer decoder cross-attending to the image patch tokens.

Trained with teacher forcing (cross-entropy on the next token); decoded greedily or by beam search
(`options.decode`); scored with BLEU-1…4, ROUGE-L and CIDEr-D (`mmtune.caption_metrics`, equal to
pycocoevalcap's on the same tokens), METEOR with `options.meteor` where Java is present.
Data: any records with captions (pairs files, COCO captions JSON, caption folders, `shapes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader

from mmtune.caption_metrics import caption_metrics
from mmtune.data import ImageTextDataset, Record
from mmtune.data.images import load_image
from mmtune.errors import ConfigError
from mmtune.models.fusion import (
    FusionModel,
    beam_search,
    build_vocab,
    greedy_decode,
    load_fusion_spec,
    save_fusion_spec,
)
from mmtune.tasks.base import Evaluation, Task


class CaptionOptions(BaseModel):
    """`options:` of the caption task."""

    model_config = ConfigDict(extra="forbid")
    decoder_layers: int = Field(3, ge=1, description="Depth of the caption decoder.")
    dim: int = Field(128, gt=0, description="Width of the decoder.")
    heads: int = Field(4, gt=0, description="Attention heads of the decoder.")
    max_len: int = Field(64, ge=4, description="Caption length limit in tokens (with [CLS]/[SEP]).")
    decode: Literal["greedy", "beam"] = Field("greedy", description="Decoding at evaluation.")
    beams: int = Field(3, ge=1, description="Beam width for decode=beam.")
    meteor: bool = Field(False, description="Also compute METEOR (needs Java; slower).")


def image_dataset(records, processor, seed: int) -> ImageTextDataset:
    """One item per image with its captions (questions collapsed), the eval transform."""
    return ImageTextDataset(image_records(records), processor.transform(augment=False), seed)


def count_images(records) -> int:
    """A task's `count`: images, not question records (a `shapes` scene carries 20 questions)."""
    return len(image_records(records))


def image_records(records) -> list[Record]:
    """One record per image (question records of one image collapse into one)."""
    seen: dict[str, Record] = {}
    for r in records:
        key = getattr(r, "image_id", "") or (r.image if isinstance(r.image, str) else r.id)
        if key not in seen and r.captions:
            seen[key] = Record(image=r.image, captions=list(r.captions), id=key)
    return list(seen.values())


class CaptionTask(Task):
    """Describe an image in words."""

    name = "caption"
    Options = CaptionOptions
    metric, higher_is_better = "caption.bleu4", True
    routes = ("predict",)

    def build(self):
        from mmtune.models import load_model

        model, self.processor = load_model(self.cfg.model)
        o = self.opts
        train = image_records(self.ctx.splits.train if self.ctx.splits else [])
        if not train:
            raise ConfigError("task caption needs training records with captions")
        head = self.head_spec([c for r in train for c in r.captions])
        if isinstance(model, FusionModel):
            model.add_head("caption", head)
            return model
        spec = {"dim": o.dim, "layers": 0, "heads": o.heads, "fusion": "none", "heads_spec": {"caption": head}}
        return FusionModel(model, spec)

    def head_spec(self, texts: list[str]) -> dict:
        """The caption decoder's spec, its vocabulary from the training captions `texts`."""
        o = self.opts
        return {
            "kind": "decoder",
            "vocab_ids": build_vocab(self.processor.tokenizer, texts),
            "layers": o.decoder_layers,
            "max_len": o.max_len,
            "memory": "image",
        }

    def save(self, model, folder: Path) -> None:
        save_fusion_spec(model, self.processor, folder)

    def load(self, folder: Path):
        model, self.processor = load_fusion_spec(folder)
        return model

    def count(self, records) -> int:
        return count_images(records)

    def dataset(self, records, train: bool):
        return image_dataset(records, self.processor, self.cfg.seed)

    def collate(self, items):
        items = [it for it in items if it is not None]
        if not items:
            return {}
        return {"pixel_values": torch.from_numpy(np.stack([it["pixel_values"] for it in items])), **self.targets(items)}

    def targets(self, items) -> dict:
        """Items' sampled `caption` → caption_ids (B, L) (training targets); their `captions` → references."""
        enc = self.processor.tokenizer(
            [it["caption"] for it in items],
            padding="longest",
            truncation=True,
            max_length=self.opts.max_len,
            return_tensors="pt",
        )
        return {"caption_ids": enc["input_ids"], "references": [it["captions"] for it in items]}

    def memory(self, model, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the decoder cross-attends to: the image's patch tokens (B, N, H), no mask."""
        return model.image_tokens(batch["pixel_values"].to(self.ctx.device)), None

    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        ids = model.head["caption"].to_compact(batch["caption_ids"])  # [PAD] is compact 0
        mem, mask = self.memory(model, batch)
        logits = model.head["caption"](ids[:, :-1], mem, mask)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), ignore_index=0)
        return {"loss": loss, "samples": len(ids)}

    def generate(self, model, pixel_values) -> list[str]:
        """Captions for (B, 3, S, S) pixels, decoded as options.decode says."""
        return self.describe(model, {"pixel_values": pixel_values})

    @torch.no_grad()
    def describe(self, model, batch) -> list[str]:
        """Captions for a batch (its `memory`), decoded as options.decode says."""
        if "caption" not in model.head:
            raise ConfigError(f"the model has no caption head: train it with task {self.name}")
        tok, dec = self.processor.tokenizer, model.head["caption"]
        with self.ctx.autocast():
            mem, mask = self.memory(model, batch)
            special = {"bos": tok.cls_token_id, "eos": tok.sep_token_id}
            if self.opts.decode == "beam":
                out = beam_search(dec, mem, self.opts.beams, memory_mask=mask, **special)
            else:
                out = greedy_decode(dec, mem, mask, **special)
        return [tok.decode(ids).strip() for ids in out]

    def evaluate(self, model, records) -> Evaluation:
        ds = self.dataset(records, train=False)
        if not len(ds):
            return Evaluation({})
        loader = DataLoader(ds, batch_size=self.cfg.data.eval_batch_size, num_workers=0, collate_fn=self.collate)
        hyps, refs = [], []
        for batch in loader:
            hyps += self.describe(model, batch)
            refs += batch["references"]
        m = caption_metrics(hyps, refs, with_meteor=self.opts.meteor)
        return Evaluation({f"caption.{k}": v for k, v in m.items()})

    def predict_inputs(self, records) -> list[dict]:
        return [{"image": load_image(r.image)} for r in image_records(records)]

    def format_prediction(self, output: dict) -> str:
        return output["caption"]

    def predict(self, model, inputs: list[dict]) -> list[dict]:
        """Each input {"image": PIL/path} → {"caption"}."""
        tf = self.processor.transform()
        px = torch.from_numpy(np.stack([tf(load_image(inp["image"])) for inp in inputs]))
        return [{"caption": c} for c in self.generate(model, px)]
