"""The server over real HTTP: uvicorn on a free loopback port, every endpoint and bad input.

References are independent of the server: the model's own verbs on the processor's inputs, the
task's `predict`, and a numpy brute-force search over the embeddings file.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from mmtune.data.images import load_image
from mmtune.serve import Backend, ServeConfig, create_app

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# ---------------------------------------------------------------- fixtures and helpers


def make_run(root: Path) -> Path:
    """A run folder of the tiny-clip preset (random weights, seed 0), as `mmtune train` lays it."""
    from mmtune.checkpoint import save_checkpoint
    from mmtune.models.load import preset, save_spec

    torch.manual_seed(0)
    model, proc, _ = preset("tiny-clip")
    save_spec(model, proc, root / "model")
    save_checkpoint(root / "checkpoints" / "last", model)
    return root


def make_images(folder: Path, n: int) -> list[Path]:
    """n real digit images (scikit-learn) as PNG, each with a caption .txt."""
    from sklearn.datasets import load_digits

    d = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"d{i:03d}.png"
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((24, 24)).save(p)
        p.with_suffix(".txt").write_text(f"a photo of the digit {NAMES[d.target[i]]}\n")
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run, 30 images, their embeddings and an exact index."""
    from mmtune.embed import embed_items, image_items
    from mmtune.retrieval import IndexConfig, build_index, read_embeddings, save_index
    from mmtune.runs import load_run

    root = tmp_path_factory.mktemp("serve")
    run = make_run(root / "run")
    paths = make_images(root / "imgs", 30)
    model, proc = load_run(run)
    emb_file = root / "emb.parquet"
    embed_items(model, proc, image_items(root / "imgs"), emb_file, progress=False, checkpoint=run)
    emb = read_embeddings(emb_file)
    save_index(root / "index", build_index(emb.vectors, IndexConfig()), emb, IndexConfig())
    return {"root": root, "run": run, "paths": paths, "emb": emb, "model": model, "proc": proc}


class LiveServer:
    """uvicorn serving `app` in a thread on a socket bound to a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("server never became ready")


@pytest.fixture(scope="module")
def server(world):
    cfg = ServeConfig(max_texts=4, max_labels=5, max_k=8, max_body_bytes=200_000)
    backend = Backend.from_run(world["run"], world["root"] / "index")
    with LiveServer(create_app(backend, cfg)) as s:
        yield s


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A ~100-byte PNG whose header declares width × height pixels."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of header fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


# ---------------------------------------------------------------- endpoints


def test_embed_texts_equal_the_model(server, world):
    texts = ["a photo of the digit three", "seven", "x"]
    r = httpx.post(server.url + "/v1/embed", json={"texts": texts})
    assert r.status_code == 200, r.text
    got = np.array(r.json()["embeddings"])
    with torch.no_grad():
        want = world["model"].encode_text(**world["proc"].tokenize(texts)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_embed_image_upload_equals_the_model(server, world):
    path = world["paths"][4]
    r = httpx.post(server.url + "/v1/embed", files={"image": ("q.png", png_bytes(path))})
    assert r.status_code == 200, r.text
    with torch.no_grad():
        want = world["model"].encode_image(world["proc"].images([load_image(path)])).numpy()
    np.testing.assert_allclose(np.array(r.json()["embeddings"]), want, atol=1e-5)


def test_classify_equals_the_task_predict(server, world):
    from mmtune.runs import open_run

    labels = ["a photo of the digit zero", "a photo of the digit one", "a cat"]
    path = world["paths"][1]
    files = {"image": ("q.png", png_bytes(path))}
    r = httpx.post(server.url + "/v1/classify", files=files, data={"labels": json.dumps(labels)})
    assert r.status_code == 200, r.text
    task, model = open_run(world["run"])  # the run's own task, as `mmtune predict` uses it
    want = task.predict(model, [{"image": load_image(path), "labels": labels}])[0]
    np.testing.assert_allclose(r.json()["probs"], want["probs"], atol=1e-5)
    assert r.json()["labels"] == labels


def brute_force(world, query: np.ndarray, k: int) -> list[int]:
    scores = world["emb"].vectors @ query
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]


def test_search_text_and_image_match_brute_force(server, world):
    r = httpx.post(server.url + "/v1/search", json={"text": "a photo of the digit two", "k": 5})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    with torch.no_grad():
        q = world["model"].encode_text(**world["proc"].tokenize(["a photo of the digit two"]))
    want = brute_force(world, q[0].numpy(), 5)
    assert [h["row"] for h in hits] == want
    assert [h["path"] for h in hits] == [world["emb"].meta["path"][i] for i in want]
    path = world["paths"][7]
    r = httpx.post(server.url + "/v1/search", files={"image": ("q.png", png_bytes(path))}, data={"k": "3"})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["path"] == str(path) and top["score"] == pytest.approx(1.0, abs=1e-5)


def test_result_images_are_served_by_row_only(server, world):
    hit = httpx.post(server.url + "/v1/search", json={"text": "one", "k": 1}).json()["results"][0]
    r = httpx.get(server.url + hit["image_url"])
    assert r.status_code == 200 and r.content == Path(hit["path"]).read_bytes()
    assert httpx.get(server.url + "/v1/images/999").status_code == 404
    assert httpx.get(server.url + "/v1/images/-1").status_code == 404
    r = httpx.get(server.url + "/v1/images/..%2f..%2fetc%2fpasswd")
    assert r.status_code in (404, 422) and "root:" not in r.text


def test_result_images_inside_tar_shards_are_served(world, tmp_path):
    """An index over a shard folder (`mmtune data shard`): each hit's image comes out of its tar
    with its own bytes and type; once the shard is gone, a 404 — and the server stays up."""
    from mmtune.data.formats import Record
    from mmtune.data.shards import write_shards
    from mmtune.embed import embed_items, image_items
    from mmtune.retrieval import IndexConfig, build_index, read_embeddings, save_index

    paths = world["paths"][:6]
    write_shards([Record(str(p), ["x"], None, p.name) for p in paths], tmp_path / "shards", 4)
    emb_file = tmp_path / "emb.parquet"
    embed_items(
        world["model"],
        world["proc"],
        image_items(tmp_path / "shards"),
        emb_file,
        progress=False,
        checkpoint=world["run"],
    )
    emb = read_embeddings(emb_file)
    save_index(tmp_path / "index", build_index(emb.vectors, IndexConfig()), emb, IndexConfig())
    backend = Backend.from_run(world["run"], tmp_path / "index")
    with LiveServer(create_app(backend, ServeConfig())) as s:
        files = {"image": ("q.png", png_bytes(paths[5]))}
        hit = httpx.post(s.url + "/v1/search", files=files, data={"k": "1"}).json()["results"][0]
        assert ".tar#" in hit["path"]
        r = httpx.get(s.url + hit["image_url"])
        assert r.status_code == 200, r.text
        assert r.content == paths[5].read_bytes() and r.headers["content-type"] == "image/png"
        for tar in (tmp_path / "shards").glob("*.tar"):
            tar.unlink()
        r = httpx.get(s.url + hit["image_url"])
        assert r.status_code == 404 and "error" in r.json()
        assert httpx.get(s.url + "/health/ready").status_code == 200


def test_health_page_and_predict_route(server):
    assert httpx.get(server.url + "/health/live").json() == {"status": "live"}
    assert httpx.get(server.url + "/health/ready").status_code == 200
    h = httpx.get(server.url + "/healthz")
    assert h.status_code == 200 and h.json()["index_rows"] == 30
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and 'id="search-form"' in page.text
    assert "text/html" in page.headers["content-type"]


def test_predict_route_comes_from_the_task(server, world):
    files = {"image": ("q.png", png_bytes(world["paths"][0]))}
    inputs = json.dumps({"labels": ["zero", "one"]})
    r = httpx.post(server.url + "/v1/predict/contrastive", files=files, data={"inputs": inputs})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["labels"] == ["zero", "one"] and sum(out["probs"]) == pytest.approx(1.0, abs=1e-5)
    r = httpx.post(server.url + "/v1/predict/contrastive", files=files, data={"inputs": "{}"})
    assert r.status_code == 422 and "labels" in r.json()["error"]


# ---------------------------------------------------------------- bad input


def _length(data: bytes) -> int:
    m = re.search(rb"content-length: (\d+)", data, re.I)
    return int(m.group(1)) if m else 0


def raw_request(url: str, head: bytes, body_chunks=()) -> tuple[int, bytes]:
    """Send a hand-made request; return (status, response) without reading more than needed."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        for chunk in body_chunks:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            part = s.recv(65536)
            if not part:
                break
            data += part
    return int(data.split(b" ", 2)[1]), data


def test_body_over_the_limit_is_refused_before_it_is_read(server):
    """V1: a body over the limit, with and without Content-Length → 413 before it is all read."""
    # Content-Length declared over the limit: 413 while not one body byte has been sent.
    head = b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    status, data = raw_request(server.url, head)
    assert status == 413 and b"limit" in data
    # chunked, no Content-Length: cut off once past the limit
    head = b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (100_000, b" " * 100_000)
    status, _ = raw_request(server.url, head, [chunk] * 5 + [b"0\r\n\r\n"])
    assert status == 413


def test_multipart_with_thousands_of_parts_is_refused(server):
    """V2: multipart with thousands of fields, or many files → 400/413."""
    fields = {f"f{i}": "x" for i in range(3000)}
    r = httpx.post(server.url + "/v1/embed", files={"image": ("a.png", b"x")}, data=fields)
    assert r.status_code in (400, 413), r.text
    files = [("image", (f"{i}.png", b"x")) for i in range(50)]
    r = httpx.post(server.url + "/v1/embed", files=files)
    assert r.status_code == 400 and "error" in r.json()


@pytest.mark.parametrize(
    ("payload", "status", "words"),
    [
        (lambda w: bomb_png(), 413, "too large"),
        (lambda w: b"<html>not an image</html>", 415, "not an image"),
        (lambda w: png_bytes(w["paths"][0])[:60], 422, "damaged"),
        (lambda w: b"", 422, "empty"),
    ],
    ids=["bomb", "not-image", "truncated", "empty"],
)
def test_bad_uploads_get_json_errors(server, world, payload, status, words):
    """V3: a decompression bomb → 413 with a message (refused from the header: memory bounded);
    non-image, truncated and empty uploads → 415 / 422."""
    for route in ("/v1/embed", "/v1/search"):
        r = httpx.post(server.url + route, files={"image": ("q.png", payload(world))})
        assert r.status_code == status, (route, r.text)
        assert words in r.json()["error"]


@pytest.mark.parametrize(
    ("route", "body", "status", "words"),
    [
        ("/v1/embed", {"texts": []}, 422, "no texts"),
        ("/v1/embed", {"texts": ["ok", "  "]}, 422, "texts[1] is empty"),
        ("/v1/embed", {"texts": ["a"] * 5}, 413, "limit is 4"),
        ("/v1/embed", {"texts": "not a list"}, 422, "texts"),
        ("/v1/search", {"text": ""}, 422, "empty"),
        ("/v1/search", {"text": "one", "k": 9}, 422, "limit of 8"),
        ("/v1/search", {"text": "one", "k": 0}, 422, "k"),
        ("/v1/embed", {"texts": ["a"], "model": "openai/clip"}, 422, "unknown field 'model'"),
        ("/v1/search", {"text": "a", "path": "/etc/passwd"}, 422, "unknown field 'path'"),
        ("/v1/search", {"text": "a", "url": "http://x/y.jpg"}, 422, "unknown field 'url'"),
    ],
)
def test_bad_json_requests(server, route, body, status, words):
    """V4: more inputs than the limit → 413 naming it. S5: a field naming a model, path or URL
    is refused (422 naming the field): the server serves only what it was started with."""
    r = httpx.post(server.url + route, json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_bad_forms_and_content_types(server, world):
    """V4: more labels than the limit → 413 naming it; S5 for form fields; bad content types."""
    img = {"image": ("q.png", png_bytes(world["paths"][0]))}
    labels = json.dumps([f"l{i}" for i in range(6)])
    r = httpx.post(server.url + "/v1/classify", files=img, data={"labels": labels})
    assert r.status_code == 413 and "limit is 5" in r.json()["error"]
    r = httpx.post(server.url + "/v1/classify", files=img, data={"labels": "[]"})
    assert r.status_code == 422
    r = httpx.post(server.url + "/v1/classify", files=img, data={"labels": '["a"]', "model": "m"})
    assert r.status_code == 422 and "model" in r.json()["error"]
    r = httpx.post(server.url + "/v1/embed", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(server.url + "/v1/embed", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]
    r = httpx.post(server.url + "/v1/embed", data={"text": "x"}, files={"other": ("a", b"x")})
    assert r.status_code == 422
    # and the server is still up and answering correctly
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.post(server.url + "/v1/embed", json={"texts": ["fine"]}).status_code == 200


def test_batch_of_concurrent_requests_equals_requests_alone(world):
    """V9: the same text alone and inside a micro-batch of 8 → equal results, in order."""
    texts = [f"a photo of the digit {n}" * (1 + i % 3) for i, n in enumerate(NAMES[:8])]
    cfg = ServeConfig(max_batch_size=8, max_wait_ms=200)
    with LiveServer(create_app(Backend.from_run(world["run"]), cfg)) as s:
        alone = [httpx.post(s.url + "/v1/embed", json={"texts": [t]}).json() for t in texts]

        async def together():
            async with httpx.AsyncClient(base_url=s.url) as c:
                rs = await asyncio.gather(*(c.post("/v1/embed", json={"texts": [t]}) for t in texts))
                return [r.json() for r in rs]

        batched = asyncio.run(together())
        stats = httpx.get(s.url + "/healthz").json()["batching"]["text"]
    assert stats["max_batch"] > 1  # the concurrent ones really were grouped
    for a, b in zip(alone, batched, strict=True):
        np.testing.assert_allclose(a["embeddings"], b["embeddings"], atol=1e-5)
