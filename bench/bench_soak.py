"""Soak test of `mmtune serve` on loopback: mixed valid and invalid requests, memory watched.

    make bench-soak                     # = python bench/bench_soak.py → runs/bench/soak.json
    python bench/bench_soak.py --seconds 20

Starts the real server (`mmtune serve RUN …`, the `lit-minilm` bench model of bench_serve.py)
on a free loopback port and keeps 32 concurrent keep-alive clients busy for `--seconds`
(default 300). Each client draws its next request from a fixed mix: valid ones (text embedding,
image embedding, zero-shot classification) and invalid ones, each with the 4xx it must get
(a body over the limit, a corrupt image, a non-image, a decompression bomb, empty text, a lone
surrogate, too many texts or labels, bad JSON, the wrong content type, an unknown field). The
server's resident memory (VmRSS) is read after the warm-up (the first fifth, at most 30 s) and
at the end: `rss_growth` = end / after-warm-up − 1.

Targets: `valid_5xx` = 0, `invalid_answered_4xx_fraction` = 1.0 (each invalid request answered
with its own expected status), `rss_growth` ≤ 0.10. The exit code is 0 only when all are met.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_serve import NAMES, bench_model, wait_ready  # noqa: E402

LIMITS = {"max_body_bytes": 200_000, "max_texts": 8, "max_labels": 8, "max_text_chars": 500}


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    """A ~70-byte PNG whose header declares 30000 × 30000 pixels."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _raw(path: str, content: bytes, ctype: str) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: {ctype}\r\nContent-Length: {len(content)}\r\n\r\n"
    return head.encode() + content


def _json(path: str, body) -> bytes:
    return _raw(path, json.dumps(body).encode("utf-8", "surrogatepass"), "application/json")


def _form(path: str, image: bytes, data: dict | None = None) -> bytes:
    import httpx

    req = httpx.Request("POST", "http://soak" + path, files={"image": ("q.png", image)}, data=data)
    return _raw(path, req.read(), req.headers["content-type"])


def request_mix(rng: random.Random) -> tuple[list, list]:
    """(valid, invalid): lists of (kind, raw request bytes, expected status)."""
    images = [_png(i) for i in range(8)]
    labels = json.dumps([f"a photo of the digit {n}" for n in NAMES[:4]])
    valid = []
    for i in range(40):
        n = NAMES[i % 10]
        valid.append(("embed_text", _json("/v1/embed", {"texts": [f"the digit {n}, {i}"]}), 200))
        texts = [f"a photo of {n}", f"digit {n} no. {i}", "a handwritten number"]
        valid.append(("embed_texts", _json("/v1/embed", {"texts": texts}), 200))
    for img in images:
        valid.append(("embed_image", _form("/v1/embed", img), 200))
        valid.append(("classify", _form("/v1/classify", img, {"labels": labels}), 200))
    big = LIMITS["max_body_bytes"] * 10
    many = [f"label {i}" for i in range(LIMITS["max_labels"] + 1)]
    invalid = [
        (
            "oversized_body",
            b"POST /v1/embed HTTP/1.1\r\nHost: soak\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n" % big,
            413,
        ),
        ("corrupt_image", _form("/v1/embed", images[0][:150]), 422),
        ("not_an_image", _form("/v1/embed", b"<html><body>404</body></html>"), 415),
        ("decompression_bomb", _form("/v1/classify", _bomb(), {"labels": labels}), 413),
        ("empty_text", _json("/v1/embed", {"texts": ["   "]}), 422),
        ("lone_surrogate", _json("/v1/embed", {"texts": ["\ud800"]}), 422),
        ("too_many_texts", _json("/v1/embed", {"texts": ["x"] * (LIMITS["max_texts"] + 1)}), 413),
        ("too_many_labels", _form("/v1/classify", images[1], {"labels": json.dumps(many)}), 413),
        ("bad_json", _raw("/v1/embed", b'{"texts": ["a"', "application/json"), 422),
        ("wrong_content_type", _raw("/v1/embed", b"texts=a", "text/plain"), 415),
        ("unknown_field", _json("/v1/embed", {"texts": ["a"], "model": "other/model"}), 422),
        ("text_too_long", _json("/v1/embed", {"texts": ["x" * 600]}), 422),
    ]
    rng.shuffle(valid)
    return valid, invalid


async def _exchange(reader, writer, raw: bytes) -> tuple[int, bool]:
    """Send one request, read its whole answer: (status, connection closed by the server)."""
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"content-length: (\d+)", head, re.I)
    await reader.readexactly(int(m.group(1)) if m else 0)
    return status, bool(re.search(rb"connection: close", head, re.I))


async def _client(host, port, valid, invalid, stop_at, rng, tally) -> None:
    reader = writer = None
    while time.monotonic() < stop_at:
        is_valid = rng.random() < 0.6
        kind, raw, expected = rng.choice(valid if is_valid else invalid)
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            status, closed = await asyncio.wait_for(_exchange(reader, writer, raw), 60)
        except (OSError, asyncio.IncompleteReadError, ValueError, asyncio.TimeoutError) as e:
            tally["connection_errors"] += 1
            tally[f"connection_error:{kind}:{e.__class__.__name__}"] += 1
            status, closed = None, True
        if is_valid:
            tally["valid"] += 1
            tally["valid_5xx"] += status is not None and status >= 500
            tally["valid_not_200"] += status != 200
        else:
            tally["invalid"] += 1
            tally["invalid_expected"] += status == expected
        tally[f"{kind}:{status}"] += 1
        if closed and writer is not None:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def soak(host, port, pid, seconds: float, clients: int, seed: int) -> dict:
    rng = random.Random(seed)
    valid, invalid = request_mix(rng)
    tally: Counter = Counter()
    t0 = time.monotonic()
    stop_at = t0 + seconds
    warmup = min(30.0, seconds / 5)
    tasks = [
        asyncio.create_task(_client(host, port, valid, invalid, stop_at, random.Random(seed + i), tally))
        for i in range(clients)
    ]
    await asyncio.sleep(warmup)
    rss_warm = rss_kib(pid)
    samples = [rss_warm]
    while time.monotonic() < stop_at:
        await asyncio.sleep(min(5.0, max(stop_at - time.monotonic(), 0.0)))
        samples.append(rss_kib(pid))
    await asyncio.gather(*tasks)
    rss_end = rss_kib(pid)
    wall = time.monotonic() - t0
    return {
        "tally": tally,
        "seconds": round(wall, 1),
        "warmup_seconds": warmup,
        "rss_after_warmup_mib": round(rss_warm / 1024, 1),
        "rss_end_mib": round(rss_end / 1024, 1),
        "rss_max_mib": round(max(samples + [rss_end]) / 1024, 1),
        "rss_growth": round(rss_end / rss_warm - 1, 4),
    }


def start_server(run: Path, threads: str) -> tuple[subprocess.Popen, str, int]:
    over = [f"{k}={v}" for k, v in LIMITS.items()]
    cmd = [sys.executable, "-m", "mmtune.cli", "serve", str(run), "port=0", "access_log=false", *over]
    env = {**os.environ, "MMTUNE_THREADS": threads}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        m = re.search(r"Uvicorn running on http://([\d.]+):(\d+)", line)
        if m:  # keep reading its log, so a full pipe never blocks the server
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            return proc, m.group(1), int(m.group(2))
    raise SystemExit(f"server did not start (exit {proc.wait()})")


def _drain(stream) -> None:
    for line in stream:
        if "Error" in line or "error" in line:
            print("server:", line.rstrip(), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=str(ROOT / "runs" / "bench" / "serve-model"))
    p.add_argument("--output", default=str(ROOT / "runs" / "bench" / "soak.json"))
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.clients <= 0:
        p.error("--seconds and --clients must be positive")
    threads = os.environ.get("MMTUNE_THREADS", "1")
    run = bench_model(Path(args.model))
    proc, host, port = start_server(run, threads)
    try:
        wait_ready(host, port)
        res = asyncio.run(soak(host, port, proc.pid, args.seconds, args.clients, args.seed))
        proc.terminate()
        exit_code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t = res.pop("tally")
    kinds = {k: v for k, v in sorted(t.items()) if ":" in k and not k.startswith("connection")}
    result = {
        "valid_requests": t["valid"],
        "valid_5xx": t["valid_5xx"],
        "valid_not_200": t["valid_not_200"],
        "invalid_requests": t["invalid"],
        "invalid_answered_4xx_fraction": round(t["invalid_expected"] / max(t["invalid"], 1), 6),
        "connection_errors": t["connection_errors"],
        **res,
        "clients": args.clients,
        "requests_per_s": round((t["valid"] + t["invalid"]) / res["seconds"], 1),
        "answers_by_kind": kinds,
        "server_exit_code_after_sigterm": exit_code,
        "model": "lit-minilm",
        "limits": LIMITS,
        "threads": threads,
        "command": f"MMTUNE_THREADS={threads} python bench/bench_soak.py --seconds {args.seconds:g}"
        f" --clients {args.clients}",
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = (
        result["valid_5xx"] == 0
        and result["invalid_answered_4xx_fraction"] == 1.0
        and result["rss_growth"] <= 0.10
        and t["invalid"] > 0
        and t["valid"] > 0
    )
    print("targets (valid_5xx = 0, invalid 4xx = 1.0, rss_growth ≤ 0.10):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
