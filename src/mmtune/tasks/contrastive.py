"""Contrastive image–text fine-tuning (CLIP / SigLIP losses); zero-shot and retrieval evaluation."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import DataLoader

from mmtune.data import ImageTextDataset
from mmtune.data.images import load_image
from mmtune.data.prompts import check_templates_option, head_prompts, prompt_record
from mmtune.distributed import clip_loss_rows, is_distributed, siglip_loss_rows
from mmtune.errors import ConfigError, UserError
from mmtune.examples import classification_examples, retrieval_examples
from mmtune.gradcache import gradcache_loss
from mmtune.losses import caption_group_ids
from mmtune.metrics import (
    class_tables,
    classification_metrics,
    multilabel_metrics,
    retrieval_metrics,
    zeroshot_weights,
)
from mmtune.tasks.base import Evaluation, Task

log = logging.getLogger("mmtune.contrastive")


class ContrastiveOptions(BaseModel):
    """`options:` of the contrastive task."""

    model_config = ConfigDict(extra="forbid")
    loss: Literal["clip", "siglip"] = Field("clip", description="Contrastive loss.")
    class_aware: bool | Literal["auto"] = Field(
        "auto",
        description="Pairs with the same label (else the same caption) are positives, not negatives. "
        "`auto`: on when captions repeat across the training split's images, off otherwise.",
    )
    gather_features: bool = Field(
        True,
        description="With several processes, compute the loss over the global batch (features "
        "all-gathered with gradients) rather than each process's own rows.",
    )
    gradcache_chunk: int | None = Field(
        None,
        gt=0,
        description="Gradient caching: embed the batch this many rows at a time and back-propagate "
        "chunk by chunk; same gradients as the full batch, memory of one chunk. null disables.",
    )
    zeroshot: bool = Field(True, description="Evaluate zero-shot classification (needs labels).")
    retrieval: bool = Field(True, description="Evaluate image-text retrieval Recall@K.")
    templates: str | list[str] = Field(
        "eval",
        description="Prompt templates for zero-shot: the dataset's held-out `eval` ones or `train`, "
        "a built-in set (`simple`, `openai-imagenet`), one template, a list, or a file of one a line; "
        "each with one `{}` (or `{c}`) where the class name goes.",
    )
    twins: bool = Field(
        False,
        description="On built-in shapes-gen: each pair brings into its batch a twin, the scene one "
        "edit away (colours or shapes swapped between the objects, or one attribute changed) with "
        "its own caption, a hard negative in both directions.",
    )

    @field_validator("templates")
    @classmethod
    def _check_templates(cls, value):
        return check_templates_option(value)


def collate_pairs(items: list[dict | None], processor) -> dict:
    """Items of ImageTextDataset → {pixel_values (B,3,S,S), input_ids, attention_mask, labels}."""
    # an item of TwinDataset is a list: the pair and its twin
    items = [x for it in items if it is not None for x in (it if isinstance(it, list) else [it])]
    if not items:
        return {}
    batch = {"pixel_values": torch.from_numpy(np.stack([it["pixel_values"] for it in items]))}
    batch.update(processor.tokenize([it["caption"] for it in items]))
    batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    batch["captions"] = [it["caption"] for it in items]
    return batch


def caption_hash_ids(captions) -> torch.Tensor:
    """(B,) int64 ids equal for captions equal after strip + lower-case, on any process."""
    digests = [hashlib.blake2b(c.strip().lower().encode(), digest_size=8).digest() for c in captions]
    return torch.tensor([int.from_bytes(d, "little", signed=True) for d in digests])


@torch.no_grad()
def embed_images(model, records, ctx, processor, batch_size: int | None = None) -> torch.Tensor:
    """Normalised image embeddings (N, D) of records, in order, with the eval transform."""
    ds = ImageTextDataset(records, processor.transform(), seed=ctx.cfg.seed)
    bs = batch_size or ctx.cfg.data.eval_batch_size
    loader = DataLoader(ds, batch_size=bs, collate_fn=lambda x: x, num_workers=0)
    out = []
    for items in loader:
        if any(it is None for it in items):
            raise ValueError("a bad image reached evaluation; screen records first")
        px = torch.from_numpy(np.stack([it["pixel_values"] for it in items])).to(ctx.device)
        with ctx.autocast():
            out.append(model.encode_image(px).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


@torch.no_grad()
def embed_texts(model, texts: list[str], ctx, processor, batch_size: int = 256) -> torch.Tensor:
    """Normalised text embeddings (N, D), in order."""
    out = []
    for i in range(0, len(texts), batch_size):
        tok = {k: v.to(ctx.device) for k, v in processor.tokenize(texts[i : i + batch_size]).items()}
        with ctx.autocast():
            out.append(model.encode_text(**tok).float().cpu())
    return torch.cat(out)


def zeroshot_classifier(model, classes, templates, ctx, processor) -> torch.Tensor:
    """(C, D) class weights: the mean embedding of every template filled with the class name."""
    texts = [t.format(c) for c in classes for t in templates]
    return zeroshot_weights(embed_texts(model, texts, ctx, processor), len(classes), len(templates))


class TwinDataset(torch.utils.data.Dataset):
    """`data.twins`: item i is [pair i, its twin] — the twin drawn by `make_twin(record, rng)`
    (rng seeded by (seed, epoch, i)) and prepared like the pair; [pair i] alone when it has
    none."""

    def __init__(self, base: ImageTextDataset, make_twin):
        self.base, self.make_twin = base, make_twin

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> list[dict] | None:
        item = self.base[i]
        if item is None:
            return None
        b = self.base
        rng = np.random.default_rng([b.seed, b.epoch, i, 1])
        twin = self.make_twin(b.records[i], rng)
        if twin is None:
            return [item]
        other = b.item(twin, rng, -1)
        return [item] if other is None else [item, other]


class ContrastiveTask(Task):
    """Train a dual encoder so matching image–caption pairs score higher than the rest."""

    name = "contrastive"
    Options = ContrastiveOptions
    metric, higher_is_better = "zeroshot.top1", True
    routes = ("embed", "predict")
    exports = ("hf", "onnx", "open-clip")
    pairwise_loss = True

    def __init__(self, ctx):
        super().__init__(ctx)
        if self.opts.twins and self.cfg.data.dataset not in ("shapes-gen", "shapes-gen-mini"):
            raise ConfigError(f"options.twins needs the built-in shapes-gen, not {self.cfg.data.dataset}")
        # gradient caching back-propagates chunk by chunk and averages gradients itself
        self.syncs_own_gradients = bool(self.opts.gradcache_chunk)
        self.record: dict = {}  # the zero-shot classes and templates the run recorded
        self._head: torch.Tensor | None = None  # (C, D) of class_prompts(), made once for predict
        self._class_aware: bool | str | None = None  # decided at the first training batch
        self._said_shared = False

    # ------------------------------------------------------------ the model's life

    def build(self):
        from mmtune.models import load_model

        model, self.processor = load_model(self.cfg.model)
        if self.opts.loss == "siglip" and model.logit_bias is None:
            add_bias = getattr(type(model), "add_logit_bias", None)
            if add_bias is None:
                raise UserError(
                    f"options.loss=siglip needs a logit bias, which {self.cfg.model.name} lacks: use "
                    "a SigLIP checkpoint, a preset or a composed model"
                )
            model.add_logit_bias()
        return model

    def save(self, model, folder: Path) -> None:
        from mmtune.models.load import save_spec

        classes, templates = self._prompts()
        extra = None
        if classes:  # recorded, so eval and serve rebuild the same zero-shot head
            extra = {"zeroshot": prompt_record(classes, templates, self.opts.templates, self.cfg.data.classnames)}
        save_spec(model, self.processor, folder, extra=extra)

    def load(self, folder: Path):
        from mmtune.models.load import build_from_spec

        model, self.processor, spec = build_from_spec(folder)
        self.record = dict(spec.get("zeroshot") or {})
        return model

    # ------------------------------------------------------------ data

    def dataset(self, records, train: bool):
        augment = train and self.cfg.data.augment
        tf = self.processor.transform(augment=augment, rotate=self.cfg.data.augment_rotate)
        ds = ImageTextDataset(records, tf, self.cfg.seed, self.cfg.data.max_image_pixels)
        if train and self.opts.twins:
            from mmtune.data.builtin.shapes_gen import twin_record

            return TwinDataset(ds, twin_record)
        return ds

    def collate(self, items):
        return collate_pairs(items, self.processor)

    # ------------------------------------------------------------ training

    def loss(self, model, batch) -> dict:
        o = self.opts
        groups = self._group_ids(batch)
        if o.loss == "siglip" and model.logit_bias is None:
            raise ValueError("options.loss=siglip needs a model with a logit bias")

        def loss_fn(img, txt, scale, bias, rows=slice(None)):
            # this process's rows against every process's columns (when gathering)
            if o.loss == "siglip":
                return siglip_loss_rows(img, txt, scale, bias, groups, rows, o.gather_features)
            return clip_loss_rows(img, txt, scale, groups, rows, o.gather_features)

        n = len(batch["pixel_values"])
        if o.gradcache_chunk and o.gradcache_chunk < n:
            loss = gradcache_loss(model, batch, o.gradcache_chunk, loss_fn)
            return {"loss": loss, "samples": n, "logit_scale": model.scale().detach()}
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        img, txt = out["image_emb"].float(), out["text_emb"].float()
        loss = loss_fn(img, txt, out["logit_scale"], out["logit_bias"])
        return {"loss": loss, "samples": n, "logit_scale": out["logit_scale"].detach()}

    def class_aware(self) -> bool:
        """`options.class_aware`, with `auto` decided once from the training split (said in one line)."""
        if self._class_aware is None:
            self._class_aware = self.opts.class_aware
            if self._class_aware == "auto":
                records = self.ctx.splits.train if self.ctx.splits else []
                shared, distinct = repeated_captions(records)
                self._class_aware = shared > 0
                if shared:
                    by = "label" if records and all(r.label is not None for r in records) else "caption"
                    log.info(
                        "options.class_aware on (auto): %d of %d distinct training captions belong to several "
                        "images, so pairs with the same %s are positives, not negatives (false turns it off)",
                        shared,
                        distinct,
                        by,
                    )
        return bool(self._class_aware)

    def _group_ids(self, batch) -> torch.Tensor | None:
        """Class-aware positives: labels, else equal captions (hashed: equal on every rank)."""
        if not self.class_aware():
            return None
        labels = batch["labels"]
        if bool((labels >= 0).all()):
            return labels.to(batch["pixel_values"].device)
        if is_distributed() and self.opts.gather_features:
            groups = caption_hash_ids(batch["captions"])
        else:
            groups = caption_group_ids(batch["captions"])
        return groups.to(batch["pixel_values"].device)

    # ------------------------------------------------------------ evaluation and use

    def _prompts(self) -> tuple[list[str] | None, list[str]]:
        return head_prompts(self.opts.templates, self.cfg.data.classnames, self.ctx.splits, self.record)

    def class_prompts(self) -> tuple[list[str], list[str]] | None:
        classes, templates = self._prompts()
        return (classes, templates) if classes else None

    def evaluate(self, model, records) -> Evaluation:
        ctx, o, proc = self.ctx, self.opts, self.processor
        img = embed_images(model, records, ctx, proc)
        metrics: dict[str, float] = {}
        tables: dict[str, dict] = {}
        examples = {}
        # zero-shot over the records that carry a label (data.label_pattern may leave some without)
        rows = [i for i, r in enumerate(records) if r.label is not None]
        if o.zeroshot and ctx.classes and rows:
            classes, templates = self._prompts()
            w = zeroshot_classifier(model, classes, templates, ctx, proc)
            labels = [records[i].label for i in rows]
            scores = img[rows] @ w.T  # (N, C) cosine similarities
            zs = classification_metrics(scores, torch.tensor(labels))
            metrics.update({f"zeroshot.{k}": v for k, v in zs.items()})
            tables.update(class_tables(classes, scores.argmax(1), torch.tensor(labels), "zeroshot", "Zero-shot"))
            probs = (model.scale().detach().float().cpu() * scores).softmax(-1)  # as `predict` does
            found = classification_examples(probs, labels, [records[i] for i in rows], classes, "zero-shot")
            examples.update({f"zeroshot_{name}": ex for name, ex in found.items()})
        multi = [i for i, r in enumerate(records) if r.labels]  # multi-label samples: mean average precision
        if o.zeroshot and ctx.classes and multi:
            w = zeroshot_classifier(model, *self._prompts(), ctx, proc)
            ml = multilabel_metrics(img[multi] @ w.T, [records[i].labels for i in multi])
            metrics.update({f"zeroshot.{k}": v for k, v in ml.items()})
        if o.retrieval and any(r.captions for r in records):
            texts, text_groups, image_groups = caption_groups(records)
            txt = embed_texts(model, texts, ctx, proc)
            rt = retrieval_metrics(img, txt, text_groups, image_groups=image_groups)
            metrics.update({f"retrieval.{k}": v for k, v in rt.items()})
            picks = [text_groups.index(g) for g in dict.fromkeys(text_groups)][:4]  # 4 unrelated queries
            relevant = torch.tensor([text_groups[i] for i in picks])[:, None] == torch.tensor(image_groups)[None, :]
            queries = [texts[i] for i in picks]
            examples["retrieval"] = retrieval_examples(txt[picks] @ img.T, queries, relevant, records)
            shared, _ = repeated_captions(records, normalise=False)
            if shared:
                metrics["retrieval.shared_captions"] = shared
                self._say_shared(shared, len(texts))
        return Evaluation(metrics, tables=tables, examples=examples)

    def _say_shared(self, shared: int, distinct: int) -> None:
        """Once per task: why R@1 on repeated captions is not a one-to-one pairing figure."""
        if not self._said_shared:
            log.info(
                "%d of %d distinct evaluation captions belong to several images: retrieval.* counts any image "
                "or caption with the identical text as a hit (a strict R@1, which counts only the exact pair, "
                "cannot tell such images apart)",
                shared,
                distinct,
            )
        self._said_shared = True

    def predict_inputs(self, records) -> list[dict]:
        labels = [c for r in records for c in r.captions[:1]] or ["a photo."]
        return [{"image": load_image(r.image), "labels": labels} for r in records]

    def predict(self, model, inputs: list[dict]) -> list[dict]:
        """Each input {"image": PIL, "labels": [...]} → zero-shot probabilities over the labels
        (texts as given); without "labels", over the run's classes with its prompt templates."""
        out = []
        for inp in inputs:
            px = self.processor.images([inp["image"]]).to(self.ctx.device)
            with torch.no_grad():
                img = model.encode_image(px).float().cpu()
            if "labels" in inp:
                labels = list(inp["labels"])
                txt = embed_texts(model, labels, self.ctx, self.processor)
            else:
                labels, txt = self._class_head(model)
            probs = (model.scale().float().cpu() * img @ txt.T).softmax(-1)[0]
            out.append({"labels": labels, "probs": probs.tolist()})
        return out

    def _class_head(self, model) -> tuple[list[str], torch.Tensor]:
        prompts = self.class_prompts()
        if prompts is None:
            raise ValueError("give 'labels': this run records no classes")
        if self._head is None:
            self._head = zeroshot_classifier(model, *prompts, self.ctx, self.processor)
        return list(prompts[0]), self._head


def repeated_captions(records, normalise: bool = True) -> tuple[int, int]:
    """(captions shared by several records, distinct captions); `normalise`: compared after
    strip + lower-case, as class-aware groups compare them, else as the exact text."""
    owners: Counter = Counter()
    for rec in records:
        owners.update({c.strip().lower() if normalise else c for c in rec.captions})
    return sum(1 for n in owners.values() if n > 1), len(owners)


def caption_groups(records) -> tuple[list[str], list[int], list[int]]:
    """Distinct captions, with a group id per caption and per image: the connected components of
    the caption–image graph, so an identical caption shared by several images matches them all."""
    index: dict[str, int] = {}
    edges = []
    for i, rec in enumerate(records):
        for cap in rec.captions:
            edges.append((index.setdefault(cap, len(index)), i))
    parent = list(range(len(index) + len(records)))  # texts first, then images

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for t, i in edges:
        parent[find(t)] = find(len(index) + i)
    roots = [find(x) for x in range(len(parent))]
    dense = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    ids = [dense[r] for r in roots]
    return list(index), ids[: len(index)], ids[len(index) :]
