"""Text-to-image generation helpers: caption encoding, sampling a run's prior into pictures,
re-ranking candidates with an mmtune dual encoder, image grids. (The `shapes-gen` checker lives
with its scenes: `mmtune.data.builtin.shapes_check`.)"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmtune.errors import CheckpointError, UserError

# ---------------------------------------------------------------- captions → prior inputs


def compact_vocab(tokenizer, texts: list[str]) -> list[int]:
    """Tokenizer ids of the prior's text vocabulary: [PAD], [UNK], then every id the texts use."""
    from mmtune.models.fusion import build_vocab

    return build_vocab(tokenizer, texts, specials=("pad", "unk"))


def encode_captions(tokenizer, vocab_ids: list[int], texts: list[str], length: int) -> torch.Tensor:
    """(B, length) compact ids, [PAD] (0) filled; ids outside the vocabulary become [UNK] (1)."""
    index = {t: i for i, t in enumerate(vocab_ids)}
    out = torch.zeros((len(texts), length), dtype=torch.long)
    if not texts:
        return out
    for row, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
        ids = [index.get(t, 1) for t in ids[:length]]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def unnormalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, S, S) normalised pixels → values in [0, 1], on the CPU."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels.float().cpu() * s + m).clamp(0, 1)


def to_pil(pixels: torch.Tensor, mean, std) -> list[Image.Image]:
    """(B, 3, S, S) normalised pixels → RGB images."""
    arr = (unnormalise(pixels, mean, std) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


@torch.no_grad()
def generate_images(
    model,
    processor,
    prompts: list[str],
    n: int,
    seed: int = 0,
    guidance: float = 3.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    batch: int = 64,
) -> list[list[Image.Image]]:
    """n images per prompt from a `Text2ImageModel`: codes sampled by its prior, decoded by its
    VQ decoder. Deterministic for a seed."""
    from mmtune.models.prior import sample

    if n < 1:
        raise UserError(f"-n must be at least 1 (got {n})")
    model.eval()
    prior = model.prior
    gen = torch.Generator().manual_seed(seed)
    flat = [p for p in prompts for _ in range(n)]
    ids = encode_captions(processor.tokenizer, model.vocab_ids, flat, prior.text_len)
    null = torch.zeros((1, prior.text_len), dtype=torch.long)
    images: list[Image.Image] = []
    for start in range(0, len(flat), batch):
        codes = sample(prior, ids[start : start + batch], null, guidance, temperature, top_k, gen)
        images += to_pil(model.vq.decode(codes), processor.image_mean, processor.image_std)
    return [images[i * n : (i + 1) * n] for i in range(len(prompts))]


# ---------------------------------------------------------------- re-ranking


class Reranker:
    """Scores images against a text by cosine similarity under an mmtune dual-encoder run."""

    def __init__(self, run):
        from mmtune.runs import load_run

        try:
            self.model, self.processor = load_run(run)
        except CheckpointError as e:
            raise CheckpointError(f"re-ranker: {e}") from None
        if not (hasattr(self.model, "encode_image") and hasattr(self.model, "encode_text")):
            raise CheckpointError(f"re-ranker {run} is not a dual encoder (train task contrastive)")
        self.model.eval()

    @torch.no_grad()
    def scores(self, images: list[Image.Image], text: str) -> np.ndarray:
        """(len(images),) cosine similarities with `text`."""
        img = self.model.encode_image(self.processor.images(images))
        txt = self.model.encode_text(**self.processor.tokenize([text]))
        return (img @ txt.T).squeeze(1).float().numpy()


def rerank(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k best scores, best first (ties: earlier candidate first)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return order[:k]


def grid(rows: list[list[Image.Image]], scale: int = 2, pad: int = 2) -> Image.Image:
    """Rows of equal-size images → one image on a light-gray canvas."""
    if not rows or not any(rows):
        raise UserError("nothing to put in a grid")
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    cw, ch = w * scale + pad, h * scale + pad
    canvas = Image.new("RGB", (cols * cw + pad, len(rows) * ch + pad), (200, 200, 200))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            canvas.paste(im.resize((w * scale, h * scale), Image.NEAREST), (pad + c * cw, pad + r * ch))
    return canvas
