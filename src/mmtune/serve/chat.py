"""OpenAI-compatible chat for runs whose task chats: `POST /v1/chat/completions`, `GET /v1/models`.

A request is OpenAI's: `messages` of `system` / `user` / `assistant` turns whose `content` is a
string or a list of `{"type": "text", "text"}` and `{"type": "image_url", "image_url": {"url":
"data:image/png;base64,…"}}` parts (joined by line breaks, an image where its part is), plus
`max_tokens` (default: the server's `max_new_tokens`), `temperature` (default 0: greedy) and
`seed`. Images come only inside the request as data URIs: the server fetches nothing. Every
refusal is OpenAI's error object `{"error": {"message", "type", "param", "code"}}` with a 4xx.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from mmtune.data.conversations import IMAGE
from mmtune.errors import UserError
from mmtune.serve.limits import ApiError, ServeConfig, decode_upload

log = logging.getLogger("mmtune.serve")
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "name")


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat request that are served (any other is refused, not ignored)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None  # echoed back: the server answers with the one model it serves
    messages: list
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None
    n: int = 1
    stream: bool = False
    user: str | None = None


def parse_request(body: bytes) -> ChatRequest:
    """The body → a ChatRequest; 400 naming the malformed JSON, unknown field or bad value."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_json")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            raise ApiError(
                400, f"unsupported field '{loc}' (fields: {list(ChatRequest.model_fields)})", "unsupported_field"
            ) from None
        raise ApiError(400, f"field '{loc}': {first['msg']}", "invalid_value") from None
    if req.stream:
        raise ApiError(400, "stream: true is not supported; send stream: false (or leave it out)", "stream_unsupported")
    if req.n != 1:
        raise ApiError(400, f"n={req.n}: one choice per request is served", "invalid_value")
    return req


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be a string", "invalid_value")
    if IMAGE in value:
        raise ApiError(400, f"{where} contains {IMAGE}: send images as image_url parts", "invalid_value")
    try:  # JSON may carry lone surrogates ("\ud800"): no tokenizer takes them
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{where} is not valid Unicode (a lone surrogate)", "invalid_value") from None
    return value


def _parts(content: list, role: str, where: str, urls: list) -> str:
    """A list of text / image_url parts → text with an <image> mark per image (URL kept in `urls`)."""
    out = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append(_text(part.get("text"), f"{at}.text"))
        elif kind == "image_url":
            if role != "user":
                raise ApiError(400, f"{at}: only user messages carry images", "invalid_value")
            image = part.get("image_url")
            urls.append((image.get("url") if isinstance(image, dict) else image, at))
            out.append(IMAGE)
        else:
            raise ApiError(
                400, f"{at}: a content part is {{'type': 'text'}} or {{'type': 'image_url'}}", "invalid_value"
            )
    return "\n".join(out)


def parse_messages(raw: list, max_images: int) -> tuple[list[dict], list[tuple]]:
    """OpenAI messages → ([{"role", "content" with <image> marks}], [(image URL, where)])."""
    if not raw:
        raise ApiError(400, "messages is empty", "invalid_value")
    messages, urls = [], []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", "invalid_value")
        unknown = sorted(set(m) - set(MESSAGE_KEYS))
        if unknown:
            raise ApiError(
                400, f"{where}: unsupported field(s) {unknown} (fields: {list(MESSAGE_KEYS)})", "unsupported_field"
            )
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role {role!r} is not one of {', '.join(ROLES)}", "invalid_role")
        parts = isinstance(content, list)
        text = _parts(content, role, where, urls) if parts else _text(content, f"{where}.content")
        messages.append({"role": role, "content": text})
    if len(urls) > max_images:
        raise ApiError(413, f"{len(urls)} images in one request; the limit is {max_images}", "too_many_images")
    return messages, urls


def decode_data_uri(url, where: str, max_pixels: int):
    """A `data:image/…;base64,…` URI → an RGB PIL image; 400 for any other URL or bad data, 413
    for an image declaring more than `max_pixels` pixels."""
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:60] if isinstance(url, str) else repr(url)
        msg = (
            f"{where}: image_url {shown!r} is not a data: URI; the server fetches no URL (send data:image/png;base64,…)"
        )
        raise ApiError(400, msg, "invalid_image_url")
    head, comma, payload = url.partition(",")
    if not comma or not head.endswith(";base64") or not head[5:].startswith("image/"):
        raise ApiError(400, f"{where}: write the image as data:image/<type>;base64,<data>", "invalid_image_url")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the image's base64 data is invalid", "invalid_image") from None
    try:
        return decode_upload(data, max_pixels)
    except ApiError as e:
        big = e.status == 413
        raise ApiError(
            413 if big else 400, f"{where}: {e.message}", "image_too_large" if big else "invalid_image"
        ) from None


def completion(model: str, out: dict) -> dict:
    """OpenAI's chat.completion object for one task reply."""
    usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"]}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": out["text"]},
                "finish_reason": out["finish_reason"],
                "logprobs": None,
            }
        ],
        "usage": usage,
    }


def chat_routes(app: FastAPI, st, auth) -> None:
    """Add /v1/chat/completions and /v1/models; `st` is the app's shared state."""
    cfg: ServeConfig = st.cfg
    started = int(time.time())

    def model_id(backend) -> str:
        return Path(backend.name).name or "mmtune"

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        backend = st.ready()
        return {
            "object": "list",
            "data": [{"id": model_id(backend), "object": "model", "created": started, "owned_by": "mmtune"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        auth(request)
        backend = st.ready()
        if backend.chat_task is None:
            raise ApiError(
                404, "this run's task does not chat: serve a vlm-sft run for /v1/chat/completions", "not_found"
            )
        req = parse_request(await request.body())
        messages, urls = parse_messages(req.messages, cfg.max_images)
        wanted = req.max_completion_tokens or req.max_tokens or cfg.max_new_tokens
        if wanted > cfg.max_new_tokens:
            raise ApiError(
                400,
                f"max_tokens={wanted} is more than the server's limit of {cfg.max_new_tokens}",
                "max_tokens_too_large",
            )

        def decode_all():
            return [decode_data_uri(url, where, cfg.max_image_pixels) for url, where in urls]

        images = await run_in_threadpool(decode_all)
        settings = {
            "max_new_tokens": wanted,
            "temperature": req.temperature or 0.0,
            "seed": req.seed or 0,
            "max_time": cfg.request_timeout_s,  # the model thread stops about when the client is told 504
        }
        call = asyncio.get_running_loop().run_in_executor(st.executor, backend.chat, messages, images, settings)
        try:
            out = await asyncio.wait_for(call, cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the model took longer than {cfg.request_timeout_s} s", "timeout") from None
        except UserError as e:
            raise ApiError(400, str(e), "invalid_request") from None
        except Exception:
            log.exception("chat completion failed")
            raise ApiError(500, "the model failed on this request; see the server log", "server_error") from None
        return JSONResponse(completion(req.model or model_id(backend), out))
