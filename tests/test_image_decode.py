"""Reduced-scale JPEG decoding: faster, same tensor within JPEG noise, truncation still caught;
the pixel limit (data.max_image_pixels) governs, past Pillow's own; PNG text-chunk bombs."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mmtune.data.images import BadImage, ImageTransform, load_image


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    base = np.stack([xx / 640, yy / 480, (xx + yy) / 1120], -1) * 255
    arr = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(arr).save(path, quality=90)
    return path


def test_draft_decodes_small_but_not_below_the_needed_size(photo):
    full = load_image(photo)
    small = load_image(photo, draft=40)
    assert full.size == (640, 480)
    assert min(small.size) >= 40 and small.size[0] < 640  # a DCT-scaled decode happened
    assert small.size == (80, 60)  # 1/8: the largest reduction keeping both sides ≥ 40


def test_draft_gives_the_same_model_input(photo):
    t = ImageTransform(32)
    a = t(load_image(photo))
    b = t(load_image(photo, draft=t.decode_size))
    assert a.shape == b.shape == (3, 32, 32)
    assert np.abs(a - b).mean() < 0.02  # on a [-1, 1] scale: JPEG-level differences only


def test_augmenting_transform_asks_for_more_pixels():
    assert ImageTransform(32, augment=True).decode_size == 40  # 32 / 0.8
    assert ImageTransform(32).decode_size == 32


def test_truncated_jpeg_still_refused_with_draft(photo, tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    with pytest.raises(BadImage) as e:
        load_image(cut, draft=32)
    assert e.value.reason == "truncated"


def test_png_ignores_draft(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (100, 50), (10, 20, 30)).save(p)
    assert load_image(p, draft=10).size == (100, 50)


def _png(path, size, mode="1", pnginfo=None):
    Image.new(mode, size).save(path, pnginfo=pnginfo)
    return path


def test_max_pixels_setting_governs_past_pillows_own_limit(tmp_path):
    # 10000x10000 = 100 M pixels: above Pillow's default ~89.5 M, below the configured limit
    path = _png(tmp_path / "big.png", (10_000, 10_000))
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000
    img = load_image(path, max_pixels=120_000_000)
    assert img.size == (10_000, 10_000) and img.mode == "RGB"
    del img
    with pytest.raises(BadImage) as e:
        load_image(path, max_pixels=50_000_000)
    assert e.value.reason == "too_large" and "data.max_image_pixels 50000000" in str(e.value)
    assert "10000x10000" in str(e.value)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own guard is restored for others


def test_header_declaring_a_huge_image_is_refused_before_decoding(tmp_path):
    # a 1-bit 1x1 PNG whose IHDR is rewritten to declare 50000x50000: never decoded
    path = _png(tmp_path / "bomb.png", (1, 1))
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", 50_000, 50_000)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    with pytest.raises(BadImage) as e:
        load_image(path)
    assert e.value.reason == "too_large" and "50000x50000" in str(e.value)


def test_png_with_an_oversized_text_chunk_has_its_own_reason(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 10), zip=True)
    path = _png(tmp_path / "text.png", (8, 8), "RGB", info)
    with pytest.raises(BadImage) as e:
        load_image(path)
    assert e.value.reason == "text_chunk_too_large" and "MAX_TEXT_CHUNK" in str(e.value)
