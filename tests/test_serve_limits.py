"""Server limits under load and faults (RELIABILITY V5–V8, V10, V11), over real HTTP.

A backend whose text call sleeps on "slow…" and raises on "boom" makes the faults happen on
demand; the real `mmtune serve` command is started as a process for the bind and SIGTERM rows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mmtune.retrieval import load_section
from mmtune.serve import Backend, ServeConfig, create_app
from tests.test_serve import LiveServer, make_run, wait_ready

ROOT = Path(__file__).resolve().parents[1]


class FaultyBackend(Backend):
    """Sleeps `delay` s when a text starts with "slow", raises when one is "boom"."""

    delay = 2.0

    def embed_texts(self, texts):
        if any(t.startswith("slow") for t in texts):
            time.sleep(self.delay)
        if "boom" in texts:
            raise RuntimeError("backend failure")
        return super().embed_texts(texts)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("limits") / "run")


def faulty(run) -> FaultyBackend:
    base = Backend.from_run(run)
    return FaultyBackend(base.model, base.processor, None, base.tasks, "faulty")


def test_v6_timeout_gives_504_and_the_next_request_succeeds(run):
    """V6: a model call past request_timeout_s → 504 at the timeout; the next request → 200."""
    cfg = ServeConfig(request_timeout_s=1.0)
    with LiveServer(create_app(faulty(run), cfg)) as s:
        t0 = time.monotonic()
        r = httpx.post(s.url + "/v1/embed", json={"texts": ["slow one"]}, timeout=30)
        assert r.status_code == 504 and "longer than 1.0 s" in r.json()["error"]
        assert time.monotonic() - t0 < FaultyBackend.delay  # answered at the timeout, not after
        r = httpx.post(s.url + "/v1/embed", json={"texts": ["fine"]}, timeout=30)
        assert r.status_code == 200


def test_v5_requests_over_in_flight_and_waiting_limits_get_429_at_once(run):
    """V5: max_in_flight=1 + max_waiting=2: of 1 slow + 10 concurrent requests, the 2 that
    found a place in line complete after the slow one, the other 8 get 429 at once."""
    cfg = ServeConfig(max_in_flight=1, max_waiting=2, max_wait_ms=0, request_timeout_s=30)
    with LiveServer(create_app(faulty(run), cfg)) as s:

        async def flood():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                first = asyncio.create_task(c.post("/v1/embed", json={"texts": ["slow 0"]}))
                await asyncio.sleep(0.5)  # the only slot is now held by it
                rest = [asyncio.create_task(c.post("/v1/embed", json={"texts": [f"t{i}"]})) for i in range(10)]
                done, _ = await asyncio.wait(rest, timeout=FaultyBackend.delay / 2)
                early = sorted(t.result().status_code for t in done)
                return early, await asyncio.gather(first, *rest)

        early, rs = asyncio.run(flood())
        codes = [r.status_code for r in rs]
        stats = httpx.get(s.url + "/healthz").json()["requests"]
        assert httpx.get(s.url + "/health/live").status_code == 200  # probes never wait
    assert early == [429] * 8  # refused while the slow request still held the slot
    assert codes[0] == 200 and codes.count(200) == 3 and codes.count(429) == 8, codes
    assert all("server busy" in r.json()["error"] for r in rs if r.status_code == 429)
    assert stats["max_waiting_seen"] == 2 and stats["max_in_flight_seen"] == 1
    assert stats["refused"] == 8 and stats["in_flight"] == 0 and stats["waiting"] == 0


def test_v5_overload_gets_429_at_once_and_the_batch_queue_stays_bounded(run):
    """V5 (model queue): more items than max_queue waiting for the model → 429 at once."""
    cfg = ServeConfig(max_batch_size=2, max_queue=4, max_wait_ms=0, request_timeout_s=30)
    with LiveServer(create_app(faulty(run), cfg)) as s:

        async def flood():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                first = asyncio.create_task(c.post("/v1/embed", json={"texts": ["slow 0"]}))
                await asyncio.sleep(0.5)  # the model thread is now busy with it
                rest = [c.post("/v1/embed", json={"texts": [f"t{i}"]}) for i in range(12)]
                return await asyncio.gather(first, *rest)

        t0 = time.monotonic()
        rs = asyncio.run(flood())
        codes = [r.status_code for r in rs]
        stats = httpx.get(s.url + "/healthz").json()["batching"]["text"]
    assert codes[0] == 200
    assert codes.count(200) == 1 + 4 and codes.count(429) == 8, codes  # 4 queued, 8 refused
    assert all("queue full" in r.json()["error"] for r in rs if r.status_code == 429)
    assert stats["max_queue_seen"] <= 4 and stats["refused"] == 8
    assert time.monotonic() - t0 < 3 * FaultyBackend.delay


def test_v7_ready_is_503_while_loading_200_after_and_503_after_a_failure(run):
    """V7: /health/ready 503 → 200 → 503 after a backend failure; /health/live always 200."""
    gate = threading.Event()

    def load():
        gate.wait(30)
        return faulty(run)

    with LiveServer(create_app(load, ServeConfig())) as s:
        assert httpx.get(s.url + "/health/ready").status_code == 503
        assert httpx.get(s.url + "/health/live").status_code == 200
        r = httpx.post(s.url + "/v1/embed", json={"texts": ["x"]})
        assert r.status_code == 503 and "loading" in r.json()["error"]
        gate.set()
        wait_ready(s.url)
        r = httpx.post(s.url + "/v1/embed", json={"texts": ["boom"]})
        assert r.status_code == 500 and "error" in r.json()
        ready = httpx.get(s.url + "/health/ready")
        assert ready.status_code == 503 and "RuntimeError" in ready.json()["error"]
        assert httpx.get(s.url + "/health/live").status_code == 200
        assert httpx.post(s.url + "/v1/embed", json={"texts": ["ok"]}).status_code == 200
        assert httpx.get(s.url + "/health/ready").status_code == 200  # recovered


def test_v8_api_key(run, caplog):
    """V8: missing / wrong / right Bearer key → 401 / 401 / 200; the key is never logged."""
    key = "s3cret-key-123"
    access = logging.getLogger("uvicorn.access")  # does not propagate: listen to it directly
    with caplog.at_level(logging.DEBUG), LiveServer(create_app(faulty(run), api_key=key)) as s:
        access.setLevel(logging.INFO)
        access.addHandler(caplog.handler)
        body = {"texts": ["a"]}
        assert httpx.post(s.url + "/v1/embed", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        r = httpx.post(s.url + "/v1/embed", json=body, headers=wrong)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        right = {"Authorization": f"Bearer {key}"}
        assert httpx.post(s.url + "/v1/embed", json=body, headers=right).status_code == 200
        assert httpx.get(s.url + "/health/live").status_code == 200  # probes need no key
    access.removeHandler(caplog.handler)
    assert "POST /v1/embed" in caplog.text  # the access log was heard…
    assert key not in caplog.text  # …and never holds the key


def test_v10_shipped_serve_config_is_valid_and_binds_loopback():
    """V10: the default and the shipped config bind 127.0.0.1 (docs/serving.md: exposing it)."""
    cfg = load_section(ROOT / "configs" / "serve.yaml", {}, ServeConfig)
    assert cfg.host == "127.0.0.1" and ServeConfig().host == "127.0.0.1"


def _start_cli(args: list[str], env=None) -> tuple[subprocess.Popen, str]:
    """Start `mmtune serve … port=0`; return the process and its URL (read from its log)."""
    cmd = [sys.executable, "-m", "mmtune.cli", "serve", *args, "port=0", "access_log=false"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "MMTUNE_THREADS": "1", **(env or {})},
    )
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        m = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
        if m:
            return proc, m.group(1)
        assert time.monotonic() < deadline, "server did not start"
    raise AssertionError(f"server exited with {proc.wait()}")


def test_v10_v11_cli_serves_on_loopback_and_sigterm_finishes_requests_in_flight(run, tmp_path):
    """V10 + V11 with the real server process: 127.0.0.1; on SIGTERM requests in flight finish,
    a new connection is refused while they do, and the process exits 0."""
    script = tmp_path / "slow_serve.py"
    script.write_text(
        "import sys, time\n"
        "from mmtune.serve import Backend, ServeConfig, create_app\n"
        "from mmtune.serve.run import run_server\n"
        "class Slow(Backend):\n"
        "    def embed_texts(self, texts):\n"
        "        time.sleep(1.0)\n"
        "        return super().embed_texts(texts)\n"
        "b = Backend.from_run(sys.argv[1])\n"
        "app = create_app(Slow(b.model, b.processor), ServeConfig(max_wait_ms=0))\n"
        "run_server(app, port=0)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = None
    for line in proc.stdout:
        m = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
        if m:
            url = m.group(1)
            break
    assert url and url.startswith("http://127.0.0.1:")
    wait_ready(url)

    async def in_flight():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            tasks = [asyncio.create_task(c.post("/v1/embed", json={"texts": [f"t{i}"]})) for i in range(3)]
            await asyncio.sleep(0.4)  # all three sent; the first is in the model
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:  # a new connection while draining
                async with httpx.AsyncClient(base_url=url, timeout=5) as fresh:
                    late = (await fresh.post("/v1/embed", json={"texts": ["late"]})).status_code
            except httpx.ConnectError:
                late = "refused"
            pending = sum(not t.done() for t in tasks)
            return late, pending, await asyncio.gather(*tasks)

    late, pending, rs = asyncio.run(in_flight())
    assert late == "refused" and pending > 0  # refused while the others were still in flight
    assert [r.status_code for r in rs] == [200, 200, 200]
    assert proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.post(url + "/v1/embed", json={"texts": ["late"]})


def test_cli_serve_with_index_and_shipped_config(tmp_path):
    """`mmtune serve --index DIR -c configs/serve.yaml`: the index names its checkpoint."""
    from mmtune.cli import main
    from tests.test_serve import make_images

    run = make_run(tmp_path / "run")
    make_images(tmp_path / "imgs", 6)
    emb, idx = tmp_path / "emb.parquet", tmp_path / "idx"
    base = ["--no-progress"]
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(run),
                "--images",
                str(tmp_path / "imgs"),
                "-o",
                str(emb),
                *base,
            ]
        )
        == 0
    )
    assert main(["index", "build", str(emb), "-o", str(idx)]) == 0
    proc, url = _start_cli(["--index", str(idx), "-c", str(ROOT / "configs" / "serve.yaml")])
    try:
        assert url.startswith("http://127.0.0.1:")
        wait_ready(url)
        r = httpx.post(url + "/v1/search", json={"text": "a photo of the digit one", "k": 3})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
