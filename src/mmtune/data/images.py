"""Safe image decoding (missing, empty, truncated, non-image, bomb) and Pillow/numpy transforms."""

from __future__ import annotations

import io
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmtune.data.wds import read_member, shard_member

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class BadImage(Exception):
    """An unusable image; reason: missing/empty/not_image/truncated/too_large/text_chunk_too_large."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


_PIL_LIMIT = threading.Lock()


def _open_checked(source, max_pixels: int, setting: str) -> Image.Image:
    # The size is known from the header: refuse a bomb before any pixel is decoded. Pillow's own
    # limit (~89.5 M pixels) is lifted while the header is read, so `setting` alone governs.
    with _PIL_LIMIT:
        pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage(str(source), "too_large", f"{w}x{h} pixels > {setting} {max_pixels}")
    return img


def member_bytes(ref: str, parts: tuple[str, str] | None = None) -> bytes:
    """The bytes of shard member `ref` (`SHARD.tar#MEMBER`; `parts`: its `shard_member`, when the
    caller has it); BadImage when it is missing or empty."""
    parts = parts or shard_member(ref)
    data = None if parts is None else read_member(*parts)
    if data is None:
        raise BadImage(ref, "missing")
    if not data:
        raise BadImage(ref, "empty")
    return data


def load_image(
    source,
    max_pixels: int = 40_000_000,
    draft: int | None = None,
    setting: str = "data.max_image_pixels",
) -> Image.Image:
    """Decode a path, `SHARD.tar#MEMBER`, file object, array or PIL image to RGB; BadImage with a
    reason otherwise.

    `draft`: the smallest side the caller needs. A JPEG is then decoded at a reduced DCT scale
    (1/2, 1/4 or 1/8) that still keeps both sides ≥ `draft` — several times faster than a full
    decode when the model's input is much smaller than the photo. The whole stream is still read,
    so truncation is still detected. `setting`: the config field a too-large image is named by.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, np.ndarray):
        return _to_rgb(Image.fromarray(source))
    name = getattr(source, "name", source)
    member = shard_member(source) if isinstance(source, str | Path) and not os.path.exists(source) else None
    if member is not None:  # an image inside a WebDataset shard
        source = io.BytesIO(member_bytes(str(source), member))
    elif isinstance(source, str | Path):
        if not os.path.exists(source):
            raise BadImage(str(source), "missing")
        if os.path.getsize(source) == 0:
            raise BadImage(str(source), "empty")
    try:
        img = _open_checked(source, max_pixels, setting)
        if draft and img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        img.load()  # force the full decode here, so truncation surfaces now, not in a worker
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(str(name), "not_image") from None
    except ValueError as e:
        if "text chunk" in str(e) or "MAX_TEXT" in str(e):  # a PNG metadata bomb, not a cut file
            raise BadImage(str(name), "text_chunk_too_large", str(e)) from None
        raise BadImage(str(name), "truncated", str(e)) from None
    except (OSError, SyntaxError) as e:
        # Pillow reports truncated/corrupt streams as OSError ("image file is truncated").
        raise BadImage(str(name), "truncated", str(e)) from None
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clip
        arr = np.asarray(img, dtype=np.float32)
        hi = max(float(arr.max()), 1.0)
        img = Image.fromarray((arr * (255.0 / max(hi, 255.0))).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


MIN_CROP_FRAC = 0.8  # augmentation crops keep at least this fraction of each side


@dataclass(frozen=True)
class ImageTransform:
    """Resize (shorter side) + centre crop to `size`, scale to [0, 1], normalise; → (3, S, S) float32.

    With `augment` and a numpy Generator, a random scale jitter and shift is applied (and a random
    rotation of up to ±`rotate` degrees), drawn from that Generator, so augmentation is
    reproducible whatever the number of workers.
    """

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    augment: bool = False
    rotate: float = 0.0

    @property
    def decode_size(self) -> int:
        """The smallest image side this transform needs at full quality (for `load_image`'s
        `draft`): the output size, over the smallest crop fraction when augmenting."""
        return math.ceil(self.size / MIN_CROP_FRAC) if self.augment else self.size

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        s = self.size
        if self.augment and rng is not None:
            if self.rotate:
                img = _random_rotation(img, self.rotate, rng)
            img = _random_resized_crop(img, s, rng)
        else:
            w, h = img.size
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            img = img.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - s) // 2, (nh - s) // 2
            img = img.crop((left, top, left + s, top + s))
        arr = np.asarray(img, dtype=np.float32) / 255.0  # (S, S, 3)
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (3, S, S)


def _random_rotation(img: Image.Image, degrees: float, rng: np.random.Generator) -> Image.Image:
    """Rotate by an angle drawn uniformly in ±degrees; the uncovered corners take the median colour
    of the image's border (the background of a digit, a scene or a product shot)."""
    arr = np.asarray(img)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    return img.rotate(float(rng.uniform(-degrees, degrees)), resample=Image.BICUBIC, fillcolor=fill)


def _random_resized_crop(img: Image.Image, s: int, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    # keep most of the image: captions describe all of it
    frac = float(rng.uniform(MIN_CROP_FRAC, 1.0))
    cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    return img.crop((left, top, left + cw, top + ch)).resize((s, s), Image.BICUBIC)
