"""Text-to-image generation helpers: caption encoding, sampling a run's prior into pictures,
re-ranking candidates with an mmtune dual encoder, and the deterministic `shapes-gen` checker."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from mmtune.data.builtin.shapes import RGB, draw
from mmtune.data.builtin.shapes_gen import IMAGE_SIZE, QUADRANTS, RADIUS, SHAPES, Obj, parse_caption
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
def generate_images(model, processor, prompts: list[str], n: int, seed: int = 0,
                    guidance: float = 3.0, temperature: float = 1.0, top_k: int | None = None,
                    batch: int = 64) -> list[list[Image.Image]]:  # fmt: skip
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
        import mmtune.models.fusion  # noqa: F401  (registers the conv-stem tower's Auto classes)
        from mmtune.models import load_run

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


# ---------------------------------------------------------------- checker

PALETTE = {"white": (255, 255, 255)} | {
    c: rgb for c, rgb in zip(("red", "green", "blue", "orange", "yellow", "gray"), RGB, strict=True)
}
MAX_COLOUR_DISTANCE = 90.0  # farther from every palette colour: the pixel counts as no colour
MIN_AREA = 30  # pixels: smaller blobs are noise (an object is 81 or 121 pixels)
MIN_IOU = 0.5  # a blob overlapping neither shape of the renderer this much is not an object


@functools.lru_cache(maxsize=4096)
def _template(shape: int, x: int, y: int, h: int, w: int) -> np.ndarray:
    """(h, w) bool mask of the renderer's shape `shape` centred at (x, y) (read-only, cached:
    every blob of every image is matched against the same few hundred placements)."""
    t = (draw(np.array([[x, y]]), np.array([shape]), max(h, w), RADIUS, [0]) != 255).any(-1)
    t = t[:h, :w]
    t.flags.writeable = False
    return t


def _shape_of(mask: np.ndarray) -> str | None:
    """ "circle" or "square": the renderer's shape (radius / half-side RADIUS) that overlaps the
    blob `mask` best (intersection over union), placed at the blob's centroid ± 1 pixel; None when
    neither reaches MIN_IOU.

    Matching the whole shape, not the fill of the bounding box: at radius 5 a digitised disk is a
    9×9 block with its corners cut plus a 1-pixel tip on each side, so a drawing that smooths the
    tips away (any decoder does) fills its box like a square."""
    ys, xs = np.nonzero(mask)
    cx, cy = round(float(xs.mean())), round(float(ys.mean()))
    h, w = mask.shape
    best = {}
    for k, name in enumerate(SHAPES):
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                t = _template(k, cx + dx, cy + dy, h, w)
                best[name] = max(best.get(name, 0.0), (mask & t).sum() / (mask | t).sum())
    name = max(best, key=best.get)
    return name if best[name] >= MIN_IOU else None


def colour_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) index into PALETTE of each pixel's nearest colour; -1 when none is near."""
    pal = np.array(list(PALETTE.values()), np.float32)
    d = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - pal[None, None], axis=-1)
    lab = d.argmin(-1)
    lab[d.min(-1) > MAX_COLOUR_DISTANCE] = -1
    return lab


def find_objects(image: np.ndarray) -> list[Obj]:
    """Objects of a rendered (or generated) scene: per colour, each connected blob of at least
    MIN_AREA pixels that matches a shape of the renderer (`_shape_of`), its quadrant by its
    centroid."""
    from scipy import ndimage

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"checker: expected an (H, W, 3) image, got shape {image.shape}")
    labels = colour_labels(image)
    h, w = labels.shape
    found = []
    for k, colour in enumerate(PALETTE):
        if colour == "white":
            continue
        blobs, n = ndimage.label(labels == k)
        for b in range(1, n + 1):
            ys, xs = np.nonzero(blobs == b)
            if len(ys) < MIN_AREA:
                continue
            shape = _shape_of(blobs == b)
            if shape is None:
                continue
            q = 2 * int(ys.mean() >= h / 2) + int(xs.mean() >= w / 2)
            found.append(Obj(colour, shape, QUADRANTS[q]))
    return found


def check(image, prompt: str | list[Obj]) -> list[bool]:
    """For each object the prompt requests: is it in the image (colour, shape, quadrant)?"""
    wanted = parse_caption(prompt) if isinstance(prompt, str) else prompt
    if not wanted:
        raise UserError(f"checker: the prompt names no object of shapes-gen: {prompt!r}")
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if img.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        img = np.asarray(Image.fromarray(img).resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST))
    present = set(find_objects(img))
    return [o in present for o in wanted]


# ---------------------------------------------------------------- pictures


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
            canvas.paste(im.resize((w * scale, h * scale), Image.NEAREST),
                         (pad + c * cw, pad + r * ch))  # fmt: skip
    return canvas
