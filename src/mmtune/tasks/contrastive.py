"""Contrastive image–text fine-tuning (CLIP / SigLIP losses); zero-shot and retrieval evaluation."""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import torch
from torch.utils.data import DataLoader

from mmtune.data import ImageTextDataset
from mmtune.distributed import clip_loss_rows, is_distributed, siglip_loss_rows
from mmtune.gradcache import gradcache_loss
from mmtune.losses import caption_group_ids
from mmtune.metrics import classification_metrics, retrieval_metrics, zeroshot_weights


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
    digests = [
        hashlib.blake2b(c.strip().lower().encode(), digest_size=8).digest() for c in captions
    ]
    return torch.tensor([int.from_bytes(d, "little", signed=True) for d in digests])


def _autocast(ctx):
    return ctx.autocast() if ctx.autocast is not None else contextlib.nullcontext()


@torch.no_grad()
def embed_images(model, records, ctx, batch_size: int | None = None) -> torch.Tensor:
    """Normalised image embeddings (N, D) of records, in order, with the eval transform."""
    ds = ImageTextDataset(records, ctx.processor.transform(), seed=ctx.cfg.seed)
    bs = batch_size or ctx.cfg.data.eval_batch_size
    loader = DataLoader(ds, batch_size=bs, collate_fn=lambda x: x, num_workers=0)
    out = []
    for items in loader:
        if any(it is None for it in items):
            raise ValueError("a bad image reached evaluation; screen records first")
        px = torch.from_numpy(np.stack([it["pixel_values"] for it in items])).to(ctx.device)
        with _autocast(ctx):
            out.append(model.encode_image(px).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


@torch.no_grad()
def embed_texts(model, texts: list[str], ctx, batch_size: int = 256) -> torch.Tensor:
    """Normalised text embeddings (N, D), in order."""
    out = []
    for i in range(0, len(texts), batch_size):
        tok = {
            k: v.to(ctx.device)
            for k, v in ctx.processor.tokenize(texts[i : i + batch_size]).items()
        }
        with _autocast(ctx):
            out.append(model.encode_text(**tok).float().cpu())
    return torch.cat(out)


def zeroshot_classifier(model, classes: list[str], templates: list[str], ctx) -> torch.Tensor:
    """(C, D) class weights: the mean embedding of every template filled with the class name."""
    texts = [t.format(c) for c in classes for t in templates]
    return zeroshot_weights(embed_texts(model, texts, ctx), len(classes), len(templates))


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


def _unwrap(model):
    return getattr(model, "module", model)


class ContrastiveTask:
    """Train a dual encoder so matching image–caption pairs score higher than the rest."""

    name = "contrastive"

    def __init__(self, ctx):
        self.ctx = ctx
        self.cfg = ctx.cfg

    def build_head(self, model):
        return model  # the loss acts on the backbone's own embeddings

    def dataset(self, records, train: bool):
        augment = train and self.cfg.data.augment
        tf = self.ctx.processor.transform(augment=augment)
        ds = ImageTextDataset(records, tf, self.cfg.seed, self.cfg.data.max_image_pixels)
        if train and self.cfg.data.twins:
            from mmtune.data.builtin.shapes_gen import twin_record

            return TwinDataset(ds, twin_record)
        return ds

    def collate(self, items):
        return collate_pairs(items, self.ctx.processor)

    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        t = self.cfg.train
        groups = self._group_ids(batch)
        if t.loss == "siglip" and _unwrap(model).logit_bias is None:
            raise ValueError("train.loss=siglip needs a model with a logit bias")

        def loss_fn(img, txt, scale, bias, rows=slice(None)):
            # this process's rows against every process's columns (when gathering)
            if t.loss == "siglip":
                return siglip_loss_rows(img, txt, scale, bias, groups, rows, t.gather_features)
            return clip_loss_rows(img, txt, scale, groups, rows, t.gather_features)

        if t.gradcache_chunk and t.gradcache_chunk < len(batch["pixel_values"]):
            loss = gradcache_loss(model, batch, t.gradcache_chunk, loss_fn)
            return {"loss": loss, "logit_scale": _unwrap(model).scale().detach()}
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        img, txt = out["image_emb"].float(), out["text_emb"].float()
        loss = loss_fn(img, txt, out["logit_scale"], out["logit_bias"])
        return {"loss": loss, "logit_scale": out["logit_scale"].detach()}

    def _group_ids(self, batch) -> torch.Tensor | None:
        """Class-aware positives: labels, else equal captions (hashed: equal on every rank)."""
        if not self.cfg.train.class_aware:
            return None
        labels = batch["labels"]
        if bool((labels >= 0).all()):
            return labels.to(batch["pixel_values"].device)
        if is_distributed() and self.cfg.train.gather_features:
            groups = caption_hash_ids(batch["captions"])
        else:
            groups = caption_group_ids(batch["captions"])
        return groups.to(batch["pixel_values"].device)

    def evaluate(self, model, records) -> dict[str, float]:
        model = _unwrap(model)
        ctx, cfg = self.ctx, self.cfg
        img = embed_images(model, records, ctx)
        metrics: dict[str, float] = {}
        labels = [r.label for r in records]
        if cfg.eval.zeroshot and ctx.classes and all(lb is not None for lb in labels):
            sp = ctx.splits
            templates = sp.eval_templates if cfg.eval.templates == "eval" else sp.train_templates
            w = zeroshot_classifier(model, ctx.classes, templates, ctx)
            zs = classification_metrics(img @ w.T, torch.tensor(labels))
            metrics.update({f"zeroshot.{k}": v for k, v in zs.items()})
        if cfg.eval.retrieval and any(r.captions for r in records):
            texts, text_groups, image_groups = caption_groups(records)
            txt = embed_texts(model, texts, ctx)
            rt = retrieval_metrics(img, txt, text_groups, image_groups=image_groups)
            metrics.update({f"retrieval.{k}": v for k, v in rt.items()})
        return metrics

    def predict(self, model, inputs: list[dict]) -> list[dict]:
        """Each input {"image": PIL, "labels": [...]} → zero-shot probabilities over the labels."""
        model = _unwrap(model)
        out = []
        for inp in inputs:
            px = self.ctx.processor.images([inp["image"]]).to(self.ctx.device)
            with torch.no_grad():
                img = model.encode_image(px).float().cpu()
            txt = embed_texts(model, list(inp["labels"]), self.ctx)
            probs = (model.scale().float().cpu() * img @ txt.T).softmax(-1)[0]
            out.append({"labels": list(inp["labels"]), "probs": probs.tolist()})
        return out


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
