"""Server settings and the guards in front of the model: body size, uploads, API key, errors."""

from __future__ import annotations

import asyncio
import hmac
import io
import json
from collections import deque
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from mmtune.data.images import BadImage, load_image


class ServeConfig(BaseModel):
    """`mmtune serve` settings (YAML via --config, or key=value overrides)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Bind address; 0.0.0.0 exposes it to the network.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")
    max_batch_size: int = Field(32, gt=0, description="Most items in one model call.")
    max_wait_ms: float = Field(5.0, ge=0, description="Longest wait for a batch to fill.")
    max_queue: int = Field(256, gt=0, description="Items waiting per batcher; beyond: 429.")
    max_in_flight: int = Field(64, gt=0, description="/v1/* requests handled at once (bodies read, model calls).")
    max_waiting: int = Field(256, ge=0, description="/v1/* requests waiting for a slot; beyond: 429 at once.")
    request_timeout_s: float = Field(30.0, gt=0, description="Model wait per request; beyond: 504.")
    max_body_bytes: int = Field(8 * 2**20, gt=0, description="Largest request body; beyond: 413.")
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Uploads declaring more pixels are refused (bombs): 413."
    )
    max_video_seconds: float = Field(
        60.0, gt=0, description="Longest video upload to /v1/embed (and at most the run's data.max_video_seconds): 413."
    )
    max_texts: int = Field(64, gt=0, description="Texts per /v1/embed request.")
    max_labels: int = Field(64, gt=0, description="Candidate labels per /v1/classify request.")
    max_k: int = Field(100, gt=0, description="Largest k per /v1/search request.")
    max_text_chars: int = Field(2000, gt=0, description="Longest text accepted.")
    max_images: int = Field(8, gt=0, description="Images per /v1/chat/completions request; beyond: 413.")
    max_new_tokens: int = Field(512, gt=0, description="Largest max_tokens of /v1/chat/completions; beyond: 400.")
    tasks: list[str] | None = Field(
        None,
        description="Tasks whose `predict` is served at POST /v1/predict/<task>; null: the served "
        "run's own task (when it predicts).",
    )
    api_key_env: str | None = Field(None, description="Name of an environment variable holding a Bearer key for /v1/*.")
    access_log: bool = Field(True, description="Log one line per request (never headers).")


# Routes answering errors as OpenAI's API does: {"error": {"message", "type", "param", "code"}}
OPENAI_ROUTES = ("/v1/chat/", "/v1/models")
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An HTTP error with a message a client can act on; answered as {"error": …, "status": …}
    (OpenAI's error object on `OPENAI_ROUTES`, with `code`)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def error_json(status: int, message: str, path: str = "", code: str | None = None) -> dict:
    """The error body of a route: mmtune's `{"error", "status"}` or, on OpenAI routes, OpenAI's."""
    if not path.startswith(OPENAI_ROUTES):
        return {"error": message, "status": status}
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_body(status: int, message: str, path: str = "") -> bytes:
    return json.dumps(error_json(status, message, path)).encode()


class BodySizeLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413 before reading them all.

    A declared Content-Length over the limit is refused before any byte is read; a chunked body
    is counted as it streams and cut off as soon as it passes the limit.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await send_error(
                send, 413, f"request body larger than the limit of {self.limit} bytes", scope["path"]
            )
        seen = 0

        async def counted_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:  # the app's error handler answers 413 as JSON
                    raise HTTPException(413, f"request body larger than {self.limit} bytes")
            return msg

        await self.app(scope, counted_receive, send)


@dataclass
class FlightStats:
    """What the in-flight guard did, for /healthz and the tests."""

    in_flight: int = 0
    waiting: int = 0
    max_in_flight_seen: int = 0
    max_waiting_seen: int = 0
    refused: int = 0
    timed_out: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class InFlightLimit:
    """ASGI middleware: at most `max_in_flight` /v1/* requests at once, `max_waiting` in line.

    A request beyond both gets 429 at once, before its body is read, so the memory held by
    request bodies is bounded too; one waiting longer than `wait_timeout_s` for a slot gets 504.
    Slots are handed over in arrival order. Health probes and the page are never held back.
    """

    def __init__(self, app, max_in_flight: int, max_waiting: int, wait_timeout_s: float):
        self.app, self.max_in_flight, self.max_waiting = app, max_in_flight, max_waiting
        self.wait_timeout_s = wait_timeout_s
        self.stats = FlightStats()
        self._waiters: deque[asyncio.Future] = deque()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        st = self.stats
        if st.in_flight < self.max_in_flight and not self._waiters:
            st.in_flight += 1
        elif len(self._waiters) >= self.max_waiting:
            st.refused += 1
            msg = f"server busy ({st.in_flight} requests in flight, {st.waiting} waiting); retry later"
            return await send_error(send, 429, msg, scope["path"])
        elif not await self._wait_for_slot():
            st.timed_out += 1
            msg = f"no request slot free within {self.wait_timeout_s} s; retry later"
            return await send_error(send, 504, msg, scope["path"])
        st.max_in_flight_seen = max(st.max_in_flight_seen, st.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            self._release()

    async def _wait_for_slot(self) -> bool:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.stats.waiting = len(self._waiters)
        self.stats.max_waiting_seen = max(self.stats.max_waiting_seen, self.stats.waiting)
        try:
            await asyncio.wait_for(fut, self.wait_timeout_s)
            return True  # the releasing request handed its slot over
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            if fut.done() and not fut.cancelled():
                self._release()  # a slot arrived just as we gave up: pass it on
            elif fut in self._waiters:
                self._waiters.remove(fut)
            self.stats.waiting = len(self._waiters)
            if isinstance(e, asyncio.CancelledError):
                raise
            return False

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            self.stats.waiting = len(self._waiters)
            if not fut.done():
                fut.set_result(None)  # the slot moves to the first in line; in_flight unchanged
                return
        self.stats.in_flight -= 1


async def send_error(send, status: int, message: str, path: str = "") -> None:
    """Answer with the route's JSON error body straight from ASGI (the connection is then closed)."""
    body = error_body(status, message, path)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def check_key(authorization: str | None, key: str | None) -> None:
    """401 unless `key` is unset or the header is `Bearer <key>` (constant-time comparison)."""
    if key is None:
        return
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not authorization or not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")


def decode_upload(data: bytes, max_pixels: int):
    """Upload bytes → RGB PIL image; 413 for a bomb, 415 for a non-image, 422 for a broken one."""
    if not data:
        raise ApiError(422, "the uploaded image is empty")
    try:
        return load_image(io.BytesIO(data), max_pixels)
    except BadImage as e:
        if e.reason == "too_large":
            raise ApiError(413, f"image too large: {e.detail}") from None
        if e.reason == "not_image":
            raise ApiError(415, "the upload is not an image Pillow can read") from None
        raise ApiError(422, f"the image is damaged ({e.reason}): {e.detail}") from None


VIDEO_STATUS = {"too_large": 413, "too_long": 413, "not_video": 415}


def video_error(e: BadImage) -> ApiError:
    """A refused video upload → 413 (frame size, duration), 415 (not a video), 422 (empty, no frame)."""
    status = VIDEO_STATUS.get(e.reason, 422)
    what = "the upload is not a video PyAV can read" if status == 415 else f"video refused ({e.reason}): {e.detail}"
    return ApiError(status, what)


def check_texts(texts: list[str], limit: int, max_chars: int, what: str = "texts") -> list[str]:
    """422 for empty / whitespace-only / too-long / not-Unicode texts, 413 for too many."""
    if not texts:
        raise ApiError(422, f"no {what} given")
    if len(texts) > limit:
        raise ApiError(413, f"{len(texts)} {what} in one request; the limit is {limit}")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ApiError(422, f"{what}[{i}] is empty")
        if len(t) > max_chars:
            raise ApiError(422, f"{what}[{i}] has {len(t)} characters; the limit is {max_chars}")
        try:  # JSON may carry lone surrogates ("\ud800"): no tokenizer takes them
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(422, f"{what}[{i}] is not valid Unicode (a lone surrogate)") from None
    return texts
