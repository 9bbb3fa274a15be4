"""Fusion pre-training on image–caption pairs (ALBEF's objectives), weighted in config:

L = λ_mlm·MLM + λ_itc·ITC + λ_itm·ITM, where
- ITC: the CLIP loss on the dual encoder's pooled embeddings (`mmtune.losses.clip_loss`);
- ITM: the fusion encoder's [CLS] says whether image and text match; every image gets one hard
  negative caption and every caption one hard negative image, drawn in proportion to the
  softmax of their contrastive similarity (the true pair and identical captions excluded);
- MLM: 15% of caption tokens masked (80% [MASK], 10% random, 10% kept) and predicted by the
  fusion encoder, which sees the image.
The trained run is a `model.name` for `task: vqa` (its fusion encoder is kept, a head is added).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch.utils.data import DataLoader

from mmtune.losses import caption_group_ids, clip_loss
from mmtune.models.fusion import (
    FusionModel,
    FusionOptions,
    build_vocab,
    load_fusion_spec,
    save_fusion_spec,
)
from mmtune.tasks.base import Evaluation, Task
from mmtune.tasks.caption import count_images, image_dataset, image_records


class PretrainOptions(FusionOptions):
    """`options:` of the pretrain-fusion task."""

    model_config = ConfigDict(extra="forbid")
    mlm_weight: float = Field(1.0, ge=0, description="λ_mlm.")
    itc_weight: float = Field(1.0, ge=0, description="λ_itc.")
    itm_weight: float = Field(1.0, ge=0, description="λ_itm.")
    mask_prob: float = Field(0.15, gt=0, lt=1, description="Fraction of caption tokens masked.")


def mask_tokens(ids, attention_mask, tokenizer, prob: float, generator=None):
    """BERT masking → (masked ids, labels with -100 where nothing is predicted)."""
    special = torch.tensor(
        tokenizer.get_special_tokens_mask(ids.tolist(), already_has_special_tokens=True)
        if ids.dim() == 1
        else [tokenizer.get_special_tokens_mask(r, already_has_special_tokens=True) for r in ids.tolist()],
        dtype=torch.bool,
    )
    pick = (torch.rand(ids.shape, generator=generator) < prob) & ~special & attention_mask.bool()
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    masked = ids.clone()
    masked[pick & (roll < 0.8)] = tokenizer.mask_token_id
    rand = pick & (roll >= 0.8) & (roll < 0.9)
    masked[rand] = torch.randint(len(tokenizer), ids.shape, generator=generator)[rand]
    return masked, labels


def hard_negatives(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """(B,) one column per row drawn ∝ softmax(sim), never a column with `same` True."""
    w = sim.float().softmax(-1).masked_fill(same, 0.0) + 1e-9 * (~same)
    return torch.multinomial(w, 1).squeeze(1)


def _pretrain_forward(m: FusionModel, pixel_values, input_ids, attention_mask, masked_ids, groups):
    """{itc, itm, mlm logits/labels pieces} of one batch."""
    pooled, tokens = m.backbone._image(pixel_values)
    img = F.normalize(pooled.float(), dim=-1)
    txt = m.encode_text(input_ids, attention_mask).float()
    out = {"itc": clip_loss(img, txt, m.scale(), groups)}
    b = len(input_ids)
    with torch.no_grad():
        sim = img @ txt.T
        same = groups[:, None] == groups[None, :]
        neg_txt = hard_negatives(sim, same)  # per image
        neg_img = hard_negatives(sim.T, same)  # per caption
    rows = torch.arange(b, device=input_ids.device)
    ids = torch.cat([input_ids, input_ids[neg_txt], input_ids])
    mask = torch.cat([attention_mask, attention_mask[neg_txt], attention_mask])
    index = torch.cat([rows, rows, neg_img])
    out["itm_logits"] = m.head["itm"](m.fuse(tokens, ids, mask, index)[:, 0])
    out["mlm_logits"] = m.head["mlm"](m.fuse(tokens, masked_ids, attention_mask))
    return out


class PretrainFusionTask(Task):
    """Pre-train the fusion encoder (and the dual encoder under it) on image–caption pairs."""

    name = "pretrain-fusion"
    Options = PretrainOptions
    metric, higher_is_better = "pretrain.itm_acc", True

    def __init__(self, ctx):
        super().__init__(ctx)
        self._rng = torch.Generator().manual_seed(ctx.cfg.seed)

    def build(self):
        from mmtune.models import load_model

        model, self.processor = load_model(self.cfg.model)
        texts = [c for r in image_records(self.ctx.splits.train) for c in r.captions]
        mlm = {"kind": "mlm", "vocab_ids": build_vocab(self.processor.tokenizer, texts)}
        return FusionModel(model, self.opts.fusion_spec({"itm": {"kind": "itm"}, "mlm": mlm}))

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
        caps = [it["caption"] for it in items]
        batch = {"pixel_values": torch.from_numpy(np.stack([it["pixel_values"] for it in items]))}
        batch.update(self.processor.tokenize(caps))
        tok = self.processor.tokenizer
        batch["masked_ids"], batch["mlm_labels"] = mask_tokens(
            batch["input_ids"], batch["attention_mask"], tok, self.opts.mask_prob, self._rng
        )
        batch["groups"] = caption_group_ids(caps)  # identical captions are not negatives
        return batch

    def _parts(self, model, batch) -> dict[str, torch.Tensor]:
        keys = ("pixel_values", "input_ids", "attention_mask", "masked_ids", "groups")
        out = _pretrain_forward(model, **{k: batch[k] for k in keys})
        b = len(batch["input_ids"])
        itm_labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(out["itc"].device)
        mlm = model.head["mlm"]
        labels = batch["mlm_labels"]
        compact = torch.where(labels >= 0, _compact(mlm, labels), torch.full_like(labels, -100))
        logits = out["mlm_logits"].float()
        return {
            "itc": out["itc"],
            "itm": F.cross_entropy(out["itm_logits"].float(), itm_labels),
            "mlm": F.cross_entropy(logits.flatten(0, 1), compact.flatten(), ignore_index=-100),
            "itm_acc": (out["itm_logits"].argmax(-1) == itm_labels).float().mean(),
            "mlm_acc": _masked_acc(logits, compact),
        }

    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        p, o = self._parts(model, batch), self.opts
        total = o.mlm_weight * p["mlm"] + o.itc_weight * p["itc"] + o.itm_weight * p["itm"]
        return {"loss": total, "samples": len(batch["input_ids"]), **{k: v.detach() for k, v in p.items()}}

    @torch.no_grad()
    def evaluate(self, model, records) -> Evaluation:
        """Mean losses and MLM / ITM accuracies over batches of the split."""
        ds = self.dataset(records, train=False)
        loader = DataLoader(ds, batch_size=self.cfg.data.eval_batch_size, collate_fn=self.collate)
        sums: dict[str, float] = {}
        n = 0
        for batch in loader:
            batch = {k: v.to(self.ctx.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            for k, v in self._parts(model, batch).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        return Evaluation({f"pretrain.{k}": v / max(1, n) for k, v in sums.items()})


def _compact(mlm_head, labels: torch.Tensor) -> torch.Tensor:
    """Tokenizer ids → indices of the MLM head's compact vocabulary ([UNK] = 1 when unseen)."""
    return mlm_head.lookup[labels.clamp(min=0, max=len(mlm_head.lookup) - 1)]


def _masked_acc(logits, labels) -> torch.Tensor:
    keep = labels >= 0
    return (logits.argmax(-1)[keep] == labels[keep]).float().mean() if keep.any() else logits.new_zeros(())
