"""The classifier: a dual encoder's image side + a linear head; building, freezing, reloading."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mmtune.data import ImageTextDataset
from mmtune.errors import CheckpointError, ConfigError
from mmtune.models.dual import tower_blocks


class ImageClassifier(nn.Module):
    """logits (B, C) = head(encode_image(pixel_values (B, 3, S, S))) over normalised embeddings.

    The backbone stays whole (its text tower unused and frozen) so a checkpoint rebuilds from the
    backbone's spec; the head starts as the zero-shot classifier (scaled class-prompt embeddings).
    """

    def __init__(self, backbone: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.backbone = backbone
        n_classes, dim = weight.shape
        self.head = nn.Linear(dim, n_classes, device=next(backbone.parameters()).device)
        self.set_head(weight, bias)

    @torch.no_grad()
    def set_head(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Replace the head's weight (C, D) and bias (C,) (zero when None)."""
        self.head.weight.copy_(weight.to(self.head.weight))
        self.head.bias.copy_(torch.zeros_like(self.head.bias) if bias is None else bias)

    layer_decay: float | None = None

    def lr_scales(self) -> dict[str, float]:
        """Layer-wise lr decay: block i of L gets decay^(L - i); what precedes block 0 (patch and
        position embeddings) decay^(L + 1); the head and what follows the last block 1."""
        if not self.layer_decay:
            return {}
        tower = self.backbone.tower("vision")
        blocks = tower_blocks(tower)
        depth = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
        n, d = len(blocks), self.layer_decay
        first_block_param = next(iter(blocks[0].parameters())) if blocks else None
        scales, before = {}, True
        tower_ids = {id(p) for p in tower.parameters()}
        for name, p in self.named_parameters():
            if p is first_block_param:
                before = False
            if id(p) in depth:
                scales[name] = d ** (n - depth[id(p)])
            elif id(p) in tower_ids and before:
                scales[name] = d ** (n + 1)
        return scales

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = self.backbone.encode_image(pixel_values)  # (B, D), unit norm
        # The head runs in float32 even under autocast: a weakly regularised probe has large
        # weights, and bf16 logits would flip near-tied predictions.
        with torch.autocast(emb.device.type, enabled=False):
            return self.head(emb.float())


def require_image_tower(model, name: str) -> None:
    """A clear error when a model cannot embed images (e.g. a text-only checkpoint)."""
    try:
        tower = model.tower("vision")
    except (AttributeError, KeyError):
        tower = None
    if tower is None or not hasattr(model, "encode_image"):
        raise CheckpointError(
            f"model '{name}' has no image tower: classification needs a CLIP-family checkpoint, "
            "an mmtune run, or model.vision=<vision checkpoint> with model.text=<text checkpoint>"
        )


def require_image_checkpoint(model_cfg) -> None:
    """Refuse a local transformers checkpoint with no vision part before loading it."""
    config = Path(model_cfg.name) / "config.json"
    if model_cfg.vision is None and config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            return  # the loader reports unreadable checkpoints itself
        if "vision_config" not in data:
            kind = data.get("model_type", "unknown")
            raise CheckpointError(
                f"model '{model_cfg.name}' has no image tower (a {kind} checkpoint): "
                "classification needs a CLIP-family checkpoint, an mmtune run, or "
                "model.vision=<vision checkpoint> with model.text=<text checkpoint>"
            )


def image_side(backbone: nn.Module, image_size: int) -> set[str]:
    """Names of the backbone parameters that `encode_image` uses (tower + projection).

    Found by one backward pass through a blank image rather than by name, so it holds for any
    dual encoder; the requires_grad flags are restored afterwards.
    """
    params = dict(backbone.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    device = next(backbone.parameters()).device
    backbone.encode_image(torch.zeros(1, 3, image_size, image_size, device=device)).sum().backward()
    used = {n for n, p in params.items() if p.grad is not None}
    for n, p in params.items():
        p.grad = None
        p.requires_grad_(flags[n])
    return used


def set_trainable(
    clf: ImageClassifier,
    image_names: set[str],
    top_k: int | None = None,
    patterns: list[str] | None = None,
) -> None:
    """Train the head and the image side: all of it, its tower's top-k blocks, or name patterns.

    With `top_k`, the tower's top k blocks and the image side outside the tower (the projection)
    train, the rest of the tower (embeddings, lower blocks, final norm) is frozen; `patterns`
    (fnmatch on names such as `backbone.vision.encoder.layer.3.*`) pick exactly what trains
    besides the head.
    """
    names = {f"backbone.{n}" for n in image_names}
    allowed = set(names)
    if patterns:
        allowed = {n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)}
        for p in patterns:
            if not any(fnmatch.fnmatch(n, p) for n in names):
                raise ConfigError(
                    f"options.unfreeze pattern {p!r} matches no image-side parameter "
                    f"(names look like {sorted(names)[0]!r})"
                )
    elif top_k is not None:
        blocks = tower_blocks(clf.backbone.tower("vision"))
        if top_k > len(blocks):
            raise ConfigError(f"options.unfreeze_top_k={top_k}: the image tower has {len(blocks)}")
        top = {id(p) for b in blocks[len(blocks) - top_k :] for p in b.parameters()}
        tower = {id(p) for p in clf.backbone.tower("vision").parameters()}
        params = dict(clf.named_parameters())
        allowed = {n for n in names if id(params[n]) in top or id(params[n]) not in tower}
    for n, p in clf.named_parameters():
        p.requires_grad_(n in allowed or n.startswith("head."))


@torch.no_grad()
def classify_logits(clf: nn.Module, records, ctx, processor) -> torch.Tensor:
    """Logits (N, C) float32 of records, in order, with the evaluation transform."""
    clf.eval()
    ds = ImageTextDataset(records, processor.transform(), seed=ctx.cfg.seed)
    loader = DataLoader(ds, batch_size=ctx.cfg.data.eval_batch_size, collate_fn=lambda x: x)
    out = []
    for items in loader:
        px = torch.from_numpy(np.stack([it["pixel_values"] for it in items])).to(ctx.device)
        with ctx.autocast():
            out.append(clf(px).float().cpu())
    return torch.cat(out)


def zeroshot_head(backbone, classes: list[str], templates: list[str], ctx, processor) -> torch.Tensor:
    """(C, D): the zero-shot classifier (mean prompt embedding per class) × the logit scale."""
    from mmtune.tasks.contrastive import zeroshot_classifier

    backbone.eval()
    weights = zeroshot_classifier(backbone, classes, templates, ctx, processor)
    return weights * backbone.scale().detach().float().cpu()


def save_classifier_spec(backbone, processor, folder: str | Path, info: dict) -> None:
    """The backbone's spec plus what rebuilds the classifier (`classify`: classes, head, LoRA)."""
    from mmtune.models import save_spec

    save_spec(backbone, processor, folder, extra={"classify": info})


def rebuild_classifier(spec_dir: Path):
    """(model, processor, info) of a classify run's model folder, weights not loaded: the
    classifier with its head (and LoRA adapters) for a linear head, the backbone for a zero-shot
    head (FLYP, or any other run), whose head is made from the text tower once weights are in."""
    from mmtune.models import build_from_spec
    from mmtune.models.lora import add_lora

    backbone, processor, spec = build_from_spec(spec_dir)
    info = dict(spec.get("classify") or {"head": "zeroshot"})
    if info["head"] == "zeroshot":
        return backbone, processor, info
    dim = info.get("dim")
    if dim is None:  # written before runs recorded it: one probe image gives the embedding size
        size = processor.image_size
        dim = backbone.eval().encode_image(torch.zeros(1, 3, size, size)).shape[1]
    clf = ImageClassifier(backbone, torch.zeros(len(info["classes"]), dim))
    if info.get("lora"):
        lo = info["lora"]
        add_lora(clf, backbone.tower("vision"), lo["r"], lo["alpha"], 0.0, lo.get("targets"))
    return clf, processor, info


def load_classifier(path: str | Path, ctx):
    """(classifier, processor, info) from a classify run (or any mmtune run: zero-shot head built
    with `ctx`'s device and precision; classes and templates from the run, else from `ctx`)."""
    from mmtune.runs import resolve_checkpoint

    spec_dir, ckpt = resolve_checkpoint(path)
    model, processor, info = rebuild_classifier(spec_dir)
    from mmtune.checkpoint import read_safetensors

    _load_strict(model, read_safetensors(ckpt / "model.safetensors"), ckpt)
    if info["head"] != "zeroshot":
        return model.eval(), processor, info
    model.to(ctx.device)
    classes = info.get("classes") or ctx.classes
    templates = info.get("templates") or ctx.splits.eval_templates
    head = zeroshot_head(model, classes, templates, ctx, processor)
    return ImageClassifier(model, head).eval(), processor, info


def _load_strict(module: nn.Module, state: dict, ckpt: Path) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
