"""Gradient caching (Gao et al., 2021): contrastive batches larger than memory, exact gradients.

1. Embed the batch in chunks without autograd graphs (memory: one chunk's activations).
2. Compute the loss of the whole batch of embeddings and its gradient w.r.t. each embedding,
   block of rows by block of rows, so the (B, B) logits never exist at once.
3. Re-run each chunk with graphs and back-propagate its cached embedding gradient.

The parameter gradients equal those of the plain full-batch step (up to float rounding). Step 3
runs inside the backward of the returned loss, so a training loop calls `loss.backward()` as
usual (scaled losses, accumulation and mixed-precision scalers keep working). Each chunk's
random state is replayed in step 3, so dropout and patch dropout draw the same masks twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from mmtune.distributed import average_gradients, is_distributed

# loss_fn(image_emb (B, D), text_emb (B, D), scale (), bias () | None, rows: slice) -> the
# part of the batch loss that rows `rows` contribute (see `mmtune.distributed.clip_loss_rows`)
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor | None, slice], Tensor]


def _full(x: Tensor) -> Tensor:
    # the loss runs in float32 (or the model's float64); half-precision embeddings are upcast
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextlib.contextmanager
def _replay_rng(state: dict, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
        yield


class _GradCache:
    """The three passes over one batch; `first()` gives the loss, `second(g)` the gradients."""

    def __init__(self, model, batch: dict, chunk: int, loss_fn: LossFn):
        # the bare model: the task declares `syncs_own_gradients`, so no DDP reducer expects one
        # forward per backward; gradients are averaged by `average_gradients` at the end instead
        self.model, self.loss_fn = model, loss_fn
        px = batch["pixel_values"]
        self.device = px.device
        self.inputs = (px, batch["input_ids"], batch["attention_mask"])
        self.slices = [slice(i, i + chunk) for i in range(0, len(px), chunk)]
        dev = self.device.type
        self.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        self.rng: list[dict] = []

    def _embed(self, sl: slice) -> tuple[Tensor, Tensor]:
        px, ids, mask = (x[sl] for x in self.inputs)
        return self.model.encode_image(px), self.model.encode_text(ids, mask)

    def first(self) -> Tensor:
        """Steps 1 and 2: the loss (no graph) and its gradients w.r.t. embeddings, scale, bias."""
        images, texts = [], []
        with torch.no_grad():
            for sl in self.slices:
                self.rng.append(_rng_state(self.device))
                img, txt = self._embed(sl)
                images.append(_full(img))
                texts.append(_full(txt))
        bias = self.model.logit_bias
        leaves = [torch.cat(images), torch.cat(texts), self.model.scale().detach()]
        leaves = [x.requires_grad_() for x in leaves]
        if bias is not None:
            leaves.append(bias.detach().requires_grad_())
        args = (*leaves[:3], leaves[3] if bias is not None else None)
        loss, self.grads = 0.0, [None] * len(leaves)
        for sl in self.slices:  # the loss by blocks of rows too: (chunk, B) logits at a time
            with torch.enable_grad():
                part = self.loss_fn(*args, sl)
                # a leaf the loss does not use (the bias under CLIP) keeps None, as in autograd
                grads = torch.autograd.grad(part, leaves, allow_unused=True)
            loss = loss + part.detach()
            self.grads = [
                g if acc is None else acc if g is None else acc + g for acc, g in zip(self.grads, grads, strict=True)
            ]
        return loss

    def second(self, grad_output: Tensor) -> None:
        """Step 3: re-run each chunk with a graph and push its cached gradient through."""
        g_image, g_text, g_scale, *g_bias = (None if g is None else g * grad_output for g in self.grads)
        dev, dtype, enabled = self.autocast
        for i, sl in enumerate(self.slices):
            with _replay_rng(self.rng[i], self.device), torch.enable_grad():
                with torch.autocast(dev, dtype=dtype, enabled=enabled):
                    img, txt = self._embed(sl)
                surrogate = (_full(img) * g_image[sl]).sum() + (_full(txt) * g_text[sl]).sum()
                if i == len(self.slices) - 1:  # the scale and bias once per batch
                    if g_scale is not None:
                        surrogate = surrogate + (self.model.scale() * g_scale).sum()
                    if g_bias and g_bias[0] is not None:
                        surrogate = surrogate + (self.model.logit_bias * g_bias[0]).sum()
                surrogate.backward()
        if is_distributed():
            average_gradients(p for p in self.model.parameters() if p.requires_grad)


class _CachedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: Tensor, cache: _GradCache) -> Tensor:
        ctx.cache = cache
        return cache.first()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        ctx.cache.second(grad_output)
        ctx.cache = None  # free the cached gradients
        return None, None


def gradcache_loss(model, batch: dict, chunk: int, loss_fn: LossFn) -> Tensor:
    """The full-batch contrastive loss of `batch`, memory bounded by `chunk` rows at a time.

    `batch` holds pixel_values (B, 3, S, S), input_ids (B, L), attention_mask (B, L); `loss_fn`
    takes the whole batch of embeddings and a slice of rows, and returns their part of the loss. `loss.backward()` fills the parameter gradients exactly
    as the plain step would; with several processes they are averaged over ranks as DDP does.
    """
    anchor = torch.zeros((), requires_grad=True)  # makes autograd call the backward
    return _CachedLoss.apply(anchor, _GradCache(model, batch, chunk, loss_fn))
