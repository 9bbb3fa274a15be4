"""Image classification on a dual encoder: fine-tune, LoRA, LP-FT and FLYP through the one loop.

`options.method` picks what `mmtune train` trains; zero-shot, the linear probe and WiSE-FT train
nothing by gradient and run through `mmtune classify`, which also compares methods
(`options.compare`). Every classifier starts from the zero-shot head: the class-prompt text
embeddings × the logit scale, over normalised image embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from mmtune.classify import METHODS, TRAINED
from mmtune.classify.data import check_classes, prompt_records, shift_splits
from mmtune.classify.model import (
    ImageClassifier,
    classify_logits,
    image_side,
    require_image_tower,
    save_classifier_spec,
    set_trainable,
    zeroshot_head,
)
from mmtune.config import validate_options
from mmtune.data import ImageTextDataset
from mmtune.errors import ConfigError
from mmtune.losses import clip_loss
from mmtune.metrics import classification_metrics
from mmtune.models.freeze import count_parameters
from mmtune.tasks.contrastive import collate_pairs

Method = Literal["zeroshot", "linear-probe", "finetune", "lora", "lp-ft", "flyp", "wise-ft"]


class ClassifyOptions(BaseModel):
    """`options:` of the classify task (flat keys, so `options.lora_r=4` overrides work)."""

    model_config = ConfigDict(extra="forbid")
    method: Method = Field("finetune", description="What `mmtune train` trains.")
    compare: list[Method] = Field(
        default_factory=list, description="Methods `mmtune classify` runs (default: [method])."
    )
    per_method: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Config overrides per method, e.g. {lora: {train.lr: 3e-3}}.",
    )
    unfreeze_top_k: int | None = Field(
        None, ge=0, description="Fine-tune only the image tower's top k blocks (+ projection)."
    )
    unfreeze: list[str] = Field(
        default_factory=list, description="fnmatch patterns: fine-tune only these parameters."
    )
    lora_r: int = Field(8, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (α/r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_targets: list[str] | None = Field(
        None, description="fnmatch patterns of image-tower linear layers (default: all)."
    )
    init_head: str | None = Field(
        None, description="lp-ft: a linear-probe run whose head to start from (else fit one)."
    )
    probe_c_grid: list[float] | None = Field(
        None, description="Linear probe: inverse regularisation strengths C to try on val."
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Layer-wise lr decay: image-tower block i of L trains at lr·decay^(L−i).",
    )
    alphas: list[float] = Field(
        default_factory=lambda: [round(0.1 * i, 1) for i in range(11)],
        description="WiSE-FT mixing coefficients α to evaluate.",
    )


def classify_options(cfg) -> ClassifyOptions:
    opts = validate_options(cfg, ClassifyOptions)
    unknown = set(opts.per_method) - set(METHODS)
    if unknown:
        raise ConfigError(f"options.per_method: unknown method {sorted(unknown)[0]!r} ({METHODS})")
    if any(not 0.0 <= a <= 1.0 for a in opts.alphas):
        raise ConfigError("options.alphas: every α must lie in [0, 1]")
    return opts


class ClassifyTask:
    """Cross-entropy on a linear head over image embeddings (or FLYP's contrastive loss)."""

    name = "classify"

    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.opts = classify_options(ctx.cfg)
        self.classes = check_classes(ctx.splits)
        self._shift: dict | None = None

    @property
    def templates(self) -> list[str]:
        sp = self.ctx.splits
        return sp.eval_templates if self.cfg.eval.templates == "eval" else sp.train_templates

    # ------------------------------------------------------------ the trained module

    def build_head(self, model):
        method = self.opts.method
        if method not in TRAINED:
            raise ConfigError(
                f"options.method={method} trains nothing by gradient, so `mmtune train` cannot "
                "run it: run `mmtune classify --config CONFIG` (it runs options.compare)"
            )
        require_image_tower(model, self.cfg.model.name)
        ctx = dataclasses.replace(self.ctx, device=next(model.parameters()).device)
        info: dict[str, Any] = {
            "method": method,
            "classes": self.classes,
            "templates": self.templates,
        }
        if method == "flyp":
            info.update(head="zeroshot", trainable_params=count_parameters(model)[0])
            save_classifier_spec(model, ctx.processor, self.cfg.run_dir / "model", info)
            return model  # trained contrastively, evaluated with a zero-shot head
        info["head"] = "linear"
        clf = ImageClassifier(model, zeroshot_head(model, self.classes, self.templates, ctx))
        clf.layer_decay = self.opts.layer_decay
        if method == "lp-ft":
            clf.set_head(*self._probe_head(clf, ctx))
        if method == "lora":
            from mmtune.models.lora import add_lora

            o = self.opts
            add_lora(clf, model.tower("vision"), o.lora_r, o.lora_alpha, o.lora_dropout,
                     o.lora_targets)  # fmt: skip
            clf.head.requires_grad_(True)
            info["lora"] = {"r": o.lora_r, "alpha": o.lora_alpha, "targets": o.lora_targets}
        else:
            names = image_side(model, ctx.processor.image_size)
            set_trainable(clf, names, self.opts.unfreeze_top_k, self.opts.unfreeze)
        info["trainable_params"] = count_parameters(clf)[0]
        save_classifier_spec(model, ctx.processor, self.cfg.run_dir / "model", info)
        return clf

    def _probe_head(self, clf, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """LP-FT's start: the head of `options.init_head`, or a linear probe fitted here."""
        if self.opts.init_head:
            from mmtune.checkpoint import read_safetensors
            from mmtune.models import resolve_checkpoint

            _, ckpt = resolve_checkpoint(self.opts.init_head)
            state = read_safetensors(ckpt / "model.safetensors")
            if "head.weight" not in state or state["head.weight"].shape != clf.head.weight.shape:
                raise ConfigError(f"options.init_head: {self.opts.init_head} has no matching head")
            return state["head.weight"], state["head.bias"]
        from mmtune.classify.linear_probe import C_GRID, sweep
        from mmtune.tasks.contrastive import embed_images

        sp = self.ctx.splits
        x = {s: embed_images(clf.backbone, sp.get(s), ctx) for s in ("train", "val")}
        y = {s: torch.tensor([r.label for r in sp.get(s)]) for s in ("train", "val")}
        grid = tuple(self.opts.probe_c_grid or C_GRID)
        res = sweep(x["train"], y["train"], x["val"], y["val"], len(self.classes), grid)
        return res.weight, res.bias

    # ------------------------------------------------------------ data and loss

    def dataset(self, records, train: bool):
        if self.opts.method == "flyp":
            records = prompt_records(records, self.classes, self.ctx.splits.train_templates)
        tf = self.ctx.processor.transform(augment=train and self.cfg.data.augment)
        return ImageTextDataset(records, tf, self.cfg.seed, self.cfg.data.max_image_pixels)

    def collate(self, items):
        if self.opts.method == "flyp":
            return collate_pairs(items, self.ctx.processor)
        items = [it for it in items if it is not None]
        if not items:
            return {}
        px = torch.stack([torch.from_numpy(it["pixel_values"]) for it in items])
        return {"pixel_values": px, "labels": torch.tensor([it["label"] for it in items])}

    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        if self.opts.method == "flyp":
            out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            img, txt = out["image_emb"].float(), out["text_emb"].float()
            # many images share a class prompt: same-label pairs are positives, not negatives
            loss = clip_loss(img, txt, out["logit_scale"], batch["labels"].to(img.device))
            return {"loss": loss, "logit_scale": out["logit_scale"].detach()}
        logits = model(batch["pixel_values"]).float()  # (B, C)
        return {"loss": F.cross_entropy(logits, batch["labels"])}

    # ------------------------------------------------------------ evaluation

    def classifier(self, model) -> ImageClassifier:
        """The model as a classifier: itself, or a dual encoder with its zero-shot head (FLYP)."""
        model = getattr(model, "module", model)
        if isinstance(model, ImageClassifier):
            return model
        ctx = dataclasses.replace(self.ctx, device=next(model.parameters()).device)
        return ImageClassifier(model, zeroshot_head(model, self.classes, self.templates, ctx))

    def evaluate(self, model, records) -> dict[str, float]:
        """top1, top5, mean per-class recall; on the final split also every `data.shift` split."""
        clf = self.classifier(model)
        metrics = split_metrics(clf, records, self.ctx)
        if records is self.ctx.splits.get(self.cfg.eval.split) and self.cfg.data.shift:
            if self._shift is None:
                self._shift = shift_splits(self.cfg.data, self.classes)
            metrics.update(shift_metrics(clf, self._shift, self.ctx))
        return metrics

    def predict(self, model, inputs: list[dict]) -> list[dict]:
        """Each input {"image": PIL} → {"labels": classes, "probs": [...]}."""
        clf = self.classifier(model)
        px = self.ctx.processor.images([inp["image"] for inp in inputs]).to(self.ctx.device)
        with torch.no_grad():
            probs = clf.eval()(px).float().softmax(-1).cpu()
        return [{"labels": list(self.classes), "probs": p.tolist()} for p in probs]


def split_metrics(clf, records, ctx) -> dict[str, float]:
    logits = classify_logits(clf, records, ctx)
    return classification_metrics(logits, torch.tensor([r.label for r in records]))


def shift_metrics(clf, shift: dict, ctx) -> dict[str, float]:
    """`shift.{metric}`: the mean over shift splits; per split `shift.{name}.{metric}` if several."""
    per = {name: split_metrics(clf, recs, ctx) for name, recs in shift.items()}
    out = {}
    for key in next(iter(per.values())):
        out[f"shift.{key}"] = sum(m[key] for m in per.values()) / len(per)
        if len(per) > 1:
            out.update({f"shift.{name}.{key}": m[key] for name, m in per.items()})
    return out
