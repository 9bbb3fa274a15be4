"""Fuzzing (hypothesis, bounded examples): the image decoder and the server's request parsing.

`load_image` on random or mutated bytes either returns an RGB image or raises `BadImage`, never
anything else; random JSON bodies, raw bodies and multipart forms sent to the real server over
HTTP never get a 5xx.
"""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmtune.data.images import BadImage, load_image
from mmtune.serve import Backend, ServeConfig, create_app
from tests.test_serve import LiveServer, bomb_png, make_run

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples every run: a CI failure reproduces locally
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _encoded(fmt: str, mode: str = "RGB", size=(9, 7), **kw) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


SEEDS = [
    _encoded("PNG"),
    _encoded("PNG", "P"),
    _encoded("PNG", "LA"),
    _encoded("JPEG"),
    _encoded("JPEG", "CMYK"),
    _encoded("GIF", "P"),
    _encoded("BMP"),
    _encoded("TIFF", "I;16"),
    _encoded("WEBP"),
    _encoded("JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03"),
    bomb_png(3000, 3000),
]


@st.composite
def mutated_images(draw) -> bytes:
    """A valid encoded image with bytes flipped, cut, repeated or inserted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            data = data[:pos]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "repeat":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


@FUZZ
@given(data=st.one_of(st.binary(max_size=512), mutated_images()))
@example(data=b"")
@example(data=b"\x89PNG\r\n\x1a\n")
@example(data=b"<html><body>404</body></html>")
def test_load_image_gives_rgb_or_bad_image(data):
    try:
        img = load_image(io.BytesIO(data), max_pixels=1_000_000)
    except BadImage as e:
        assert e.reason in {"empty", "not_image", "truncated", "too_large"}
        return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0
    assert img.width * img.height <= 1_000_000


# ---------------------------------------------------------------- the server

CFG = ServeConfig(max_texts=4, max_labels=4, max_k=5, max_body_bytes=100_000, max_wait_ms=0)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("fuzz") / "run")
    server = LiveServer(create_app(Backend.from_run(run), CFG))
    with server as s, httpx.Client(base_url=s.url, timeout=30) as c:
        yield c


ROUTES = ["/v1/embed", "/v1/classify", "/v1/search", "/v1/predict/contrastive"]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "texts": st.lists(scalars, max_size=6) | json_values,
        "text": scalars,
        "k": scalars,
        "model": st.text(max_size=20),
        "path": st.just("/etc/passwd"),
    },
)


def _no_5xx(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert "error" in r.json()


@FUZZ
@given(route=st.sampled_from(ROUTES), body=st.one_of(request_like, json_values))
@example(route="/v1/embed", body={"texts": ["\ud800 lone surrogate"]})
@example(route="/v1/search", body={"text": "x", "k": float("inf")})
@example(route="/v1/search", body={"text": "x", "k": 2**70})
def test_random_json_bodies_never_get_a_5xx(client, route, body):
    content = json.dumps(body).encode("utf-8", "surrogatepass")
    _no_5xx(client.post(route, content=content, headers={"content-type": "application/json"}))


@FUZZ
@given(
    route=st.sampled_from(ROUTES),
    ctype=st.sampled_from(
        [
            "application/json",
            "text/plain",
            "multipart/form-data",
            "multipart/form-data; boundary=x",
            "",
            "application/x-www-form-urlencoded",
        ]
    ),
    body=st.binary(max_size=300),
)
@example(route="/v1/embed", ctype="application/json", body=b"\xff\xfe{")
@example(route="/v1/classify", ctype="multipart/form-data; boundary=x", body=b"--x\r\n\r\n--x--")
def test_raw_bodies_never_get_a_5xx(client, route, ctype, body):
    _no_5xx(client.post(route, content=body, headers={"content-type": ctype}))


@FUZZ
@given(
    route=st.sampled_from(ROUTES),
    fields=st.dictionaries(
        st.sampled_from(["labels", "k", "inputs", "model", "text", "image"]),
        st.text(max_size=60) | json_values.map(json.dumps),
        max_size=4,
    ),
    image=st.none() | st.binary(max_size=200) | mutated_images(),
)
def test_random_multipart_forms_never_get_a_5xx(client, route, fields, image):
    files = {"image": ("q.png", image)} if image is not None else {"other": ("x", b"x")}
    _no_5xx(client.post(route, data=fields, files=files))
