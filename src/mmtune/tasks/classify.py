"""Image classification on a dual encoder: fine-tune, LoRA, LP-FT and FLYP through the one loop.

`options.method` picks what `mmtune train` trains; zero-shot, the linear probe and WiSE-FT train
nothing by gradient and run through `mmtune classify`, which also compares methods
(`options.compare`). Every classifier starts from the zero-shot head: the class-prompt text
embeddings × the logit scale, over normalised image embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mmtune.config import validate_options
from mmtune.data import ImageTextDataset
from mmtune.data.classes import check_classes, prompt_records, shift_splits
from mmtune.data.images import load_image
from mmtune.data.prompts import check_templates_option, head_prompts, prompt_record
from mmtune.errors import ConfigError
from mmtune.examples import classification_examples
from mmtune.losses import clip_loss
from mmtune.metrics import class_tables, classification_metrics
from mmtune.models.classifier import (
    ImageClassifier,
    classify_logits,
    image_side,
    rebuild_classifier,
    require_image_tower,
    save_classifier_spec,
    set_trainable,
    zeroshot_head,
)
from mmtune.models.freeze import count_parameters
from mmtune.tasks.base import Evaluation, Task
from mmtune.tasks.contrastive import collate_pairs

METHODS = ("zeroshot", "linear-probe", "finetune", "lora", "lp-ft", "flyp", "wise-ft")
TRAINED = ("finetune", "lora", "lp-ft", "flyp")  # through the training loop

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
    unfreeze: list[str] = Field(default_factory=list, description="fnmatch patterns: fine-tune only these parameters.")
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
    templates: str | list[str] = Field(
        "eval",
        description="Prompt templates of the zero-shot head: the dataset's held-out `eval` ones or "
        "`train`, a built-in set (`simple`, `openai-imagenet`), one template, a list, or a file of "
        "one a line; each with one `{}` (or `{c}`) where the class name goes.",
    )

    @field_validator("templates")
    @classmethod
    def _check_templates(cls, value):
        return check_templates_option(value)


def classify_options(cfg) -> ClassifyOptions:
    opts = validate_options(cfg, ClassifyOptions)
    unknown = set(opts.per_method) - set(METHODS)
    if unknown:
        raise ConfigError(f"options.per_method: unknown method {sorted(unknown)[0]!r} ({METHODS})")
    if any(not 0.0 <= a <= 1.0 for a in opts.alphas):
        raise ConfigError("options.alphas: every α must lie in [0, 1]")
    return opts


class ClassifyTask(Task):
    """Cross-entropy on a linear head over image embeddings (or FLYP's contrastive loss)."""

    name = "classify"
    Options = ClassifyOptions
    metric, higher_is_better = "top1", True
    routes = ("predict",)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.opts = classify_options(ctx.cfg)
        self.classes = check_classes(ctx.splits) if ctx.splits is not None else None
        self.info: dict[str, Any] = {}
        self._shift: dict | None = None
        self.pairwise_loss = self.opts.method == "flyp"  # FLYP's contrastive loss

    @property
    def templates(self) -> list[str]:
        """The zero-shot head's templates: from the config and data, else the run's record."""
        return head_prompts(self.opts.templates, self.cfg.data.classnames, self.ctx.splits, self.info)[1]

    # ------------------------------------------------------------ the model's life

    def build(self):
        from mmtune.models import load_model

        method = self.opts.method
        if method not in TRAINED:
            raise ConfigError(
                f"options.method={method} trains nothing by gradient, so `mmtune train` cannot "
                "run it: run `mmtune classify --config CONFIG` (it runs options.compare)"
            )
        model, self.processor = load_model(self.cfg.model)
        require_image_tower(model, self.cfg.model.name)
        record = prompt_record(self.classes, self.templates, self.opts.templates, self.cfg.data.classnames)
        self.info = {"method": method, **record}
        if method == "flyp":
            self.info.update(head="zeroshot", trainable_params=count_parameters(model)[0])
            return model  # trained contrastively, evaluated with a zero-shot head
        clf = ImageClassifier(model, self._zeroshot(model))
        clf.layer_decay = self.opts.layer_decay
        if method == "lp-ft":
            clf.set_head(*self._probe_head(clf))
        if method == "lora":
            from mmtune.models.lora import add_lora

            o = self.opts
            add_lora(clf, model.tower("vision"), o.lora_r, o.lora_alpha, o.lora_dropout, o.lora_targets)
            clf.head.requires_grad_(True)
            self.info["lora"] = {"r": o.lora_r, "alpha": o.lora_alpha, "targets": o.lora_targets}
        else:
            names = image_side(model, self.processor.image_size)
            set_trainable(clf, names, self.opts.unfreeze_top_k, self.opts.unfreeze)
        self.info.update(head="linear", dim=clf.head.in_features, trainable_params=count_parameters(clf)[0])
        return clf

    def save(self, model, folder: Path) -> None:
        backbone = model.backbone if isinstance(model, ImageClassifier) else model
        save_classifier_spec(backbone, self.processor, folder, self.info)

    def load(self, folder: Path):
        model, self.processor, self.info = rebuild_classifier(folder)
        trained = self.info.get("classes")
        if self.classes is None:
            self.classes = trained
        elif self.info["head"] != "zeroshot" and trained and self.classes != trained:
            raise ConfigError(
                f"{folder.parent}: its head was trained on the classes {trained} (in that order), the "
                f"data gives {self.classes}: set data.classnames to the run's classes"
            )
        return model

    def _zeroshot(self, backbone) -> torch.Tensor:
        """The zero-shot head (C, D) of the task's classes and templates, on the model's device."""
        ctx = self.ctx
        templates = self.templates
        device = next(backbone.parameters()).device
        head_ctx = ctx if device == ctx.device else type(ctx)(ctx.cfg, ctx.splits, device)
        return zeroshot_head(backbone, self.classes, templates, head_ctx, self.processor)

    def _probe_head(self, clf) -> tuple[torch.Tensor, torch.Tensor]:
        """LP-FT's start: the head of `options.init_head`, or a linear probe fitted here."""
        if self.opts.init_head:
            from mmtune.checkpoint import read_safetensors
            from mmtune.runs import resolve_checkpoint

            _, ckpt = resolve_checkpoint(self.opts.init_head)
            state = read_safetensors(ckpt / "model.safetensors")
            if "head.weight" not in state or state["head.weight"].shape != clf.head.weight.shape:
                raise ConfigError(f"options.init_head: {self.opts.init_head} has no matching head")
            return state["head.weight"], state["head.bias"]
        from mmtune.models.linear_probe import C_GRID, sweep
        from mmtune.tasks.contrastive import embed_images

        sp = self.ctx.splits
        device = next(clf.parameters()).device
        ctx = type(self.ctx)(self.cfg, sp, device)
        x = {s: embed_images(clf.backbone, sp.get(s), ctx, self.processor) for s in ("train", "val")}
        y = {s: torch.tensor([r.label for r in sp.get(s)]) for s in ("train", "val")}
        grid = tuple(self.opts.probe_c_grid or C_GRID)
        res = sweep(x["train"], y["train"], x["val"], y["val"], len(self.classes), grid)
        return res.weight, res.bias

    # ------------------------------------------------------------ data and loss

    def dataset(self, records, train: bool):
        if self.opts.method == "flyp":
            records = prompt_records(records, self.classes, self.ctx.splits.train_templates)
        tf = self.processor.transform(augment=train and self.cfg.data.augment, rotate=self.cfg.data.augment_rotate)
        return ImageTextDataset(records, tf, self.cfg.seed, self.cfg.data.max_image_pixels)

    def collate(self, items):
        if self.opts.method == "flyp":
            return collate_pairs(items, self.processor)
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
            return {"loss": loss, "samples": len(img), "logit_scale": out["logit_scale"].detach()}
        logits = model(batch["pixel_values"]).float()  # (B, C)
        return {"loss": F.cross_entropy(logits, batch["labels"]), "samples": len(logits)}

    def lr_scales(self, model) -> dict[str, float]:
        return model.lr_scales() if isinstance(model, ImageClassifier) else {}

    # ------------------------------------------------------------ evaluation

    def classifier(self, model) -> ImageClassifier:
        """The model as a classifier: itself, or a dual encoder with its zero-shot head (FLYP)."""
        if isinstance(model, ImageClassifier):
            return model
        return ImageClassifier(model, self._zeroshot(model))

    def evaluate(self, model, records) -> Evaluation:
        """top1, top5, mean per-class recall and `loss` (the classifier's mean cross-entropy: a
        figure that still ranks runs when their accuracy on a small split ties); on the final
        split also every `data.shift` split."""
        clf = self.classifier(model)
        logits = classify_logits(clf, records, self.ctx, self.processor)
        labels = [r.label for r in records]
        metrics = classification_metrics(logits, torch.tensor(labels))
        metrics["loss"] = float(F.cross_entropy(logits.float(), torch.tensor(labels)))
        if records is self.ctx.splits.get(self.cfg.eval.split) and self.cfg.data.shift:
            if self._shift is None:
                self._shift = shift_splits(self.cfg.data, self.ctx.splits.keys)
            metrics.update(shift_metrics(clf, self._shift, self.ctx, self.processor))
        tables = class_tables(self.classes, logits.argmax(1), torch.tensor(labels), "classes", "Classes")
        examples = classification_examples(logits.softmax(-1), labels, records, self.classes, "classifier")
        return Evaluation(metrics, tables=tables, examples=examples)

    def predict_inputs(self, records) -> list[dict]:
        return [{"image": load_image(r.image)} for r in records]

    def predict(self, model, inputs: list[dict]) -> list[dict]:
        """Each input {"image": PIL} → {"labels": classes, "probs": [...]}."""
        clf = self.classifier(model)
        px = self.processor.images([inp["image"] for inp in inputs]).to(self.ctx.device)
        with torch.no_grad():
            probs = clf.eval()(px).float().softmax(-1).cpu()
        return [{"labels": list(self.classes), "probs": p.tolist()} for p in probs]


def split_metrics(clf, records, ctx, processor) -> dict[str, float]:
    logits = classify_logits(clf, records, ctx, processor)
    return classification_metrics(logits, torch.tensor([r.label for r in records]))


def shift_metrics(clf, shift: dict, ctx, processor) -> dict[str, float]:
    """`shift.{metric}`: the mean over shift splits; per split `shift.{name}.{metric}` if several."""
    per = {name: split_metrics(clf, recs, ctx, processor) for name, recs in shift.items()}
    out = {}
    for key in next(iter(per.values())):
        out[f"shift.{key}"] = sum(m[key] for m in per.values()) / len(per)
        if len(per) > 1:
            out.update({f"shift.{name}.{key}": m[key] for name, m in per.items()})
    return out
