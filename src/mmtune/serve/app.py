"""The FastAPI app: embed / classify / search / predict / chat routes, health, the search page.

Model work goes through micro-batchers onto one model thread; every request is bounded (body
size, inputs, k, time) and every refusal is a JSON body `{"error": message, "status": code}`
(OpenAI's error object on the OpenAI-compatible routes, `serve/chat.py`).
The server serves only the model and index it was started with: no request names a path, URL or
model (unknown fields are refused), and images are served by index row, never by path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from mmtune.data.images import BadImage
from mmtune.data.wds import shard_member
from mmtune.embed import ImageSource
from mmtune.serve.backend import Backend
from mmtune.serve.batcher import MicroBatcher, Overloaded
from mmtune.serve.chat import chat_routes
from mmtune.serve.limits import (
    ApiError,
    BodySizeLimit,
    InFlightLimit,
    ServeConfig,
    check_key,
    check_texts,
    decode_upload,
    error_json,
    video_error,
)

log = logging.getLogger("mmtune.serve")
PAGE = Path(__file__).with_name("page.html")


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    k: int | None = None  # default: 10, or max_k when lower


class _State:
    """What the routes share: the backend once loaded, its failure if any, the batchers."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.backend: Backend | None = None
        self.error: str | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.text: MicroBatcher | None = None
        self.image: MicroBatcher | None = None
        self.video: MicroBatcher | None = None
        self.flight: InFlightLimit | None = None
        self.shards = ImageSource()  # reads result images kept inside tar shards

    def failed(self, exc: BaseException) -> None:
        self.error = f"model call failed: {exc.__class__.__name__}"

    def succeeded(self) -> None:
        self.error = None

    def ready(self) -> Backend:
        if self.backend is None:
            raise ApiError(503, self.error or "the model is still loading")
        return self.backend


def _batchers(st: _State) -> None:
    c = st.cfg
    for name, fn in (
        ("text", lambda xs: st.backend.embed_texts(xs)),
        ("image", lambda xs: st.backend.embed_pixels(xs)),
        ("video", lambda xs: st.backend.embed_clips(xs)),
    ):
        b = MicroBatcher(fn, st.executor, c.max_batch_size, c.max_wait_ms, c.max_queue, st.failed, st.succeeded)
        b.start()
        setattr(st, name, b)


def _lifespan(st: _State, source: Backend | Callable[[], Backend]):
    @asynccontextmanager
    async def lifespan(app):
        st.executor = ThreadPoolExecutor(1, thread_name_prefix="mmtune-model")
        _batchers(st)
        loader = None
        if isinstance(source, Backend):
            st.backend = source
        else:  # load beside the running server, so /health/ready can say 503 meanwhile

            async def load():
                try:
                    st.backend = await asyncio.get_running_loop().run_in_executor(st.executor, source)
                except Exception as e:
                    st.error = f"model failed to load: {e}"
                    log.error("%s", st.error)

            loader = asyncio.create_task(load())
        yield
        if loader is not None:
            loader.cancel()
        await st.text.stop()
        await st.image.stop()
        await st.video.stop()
        st.executor.shutdown(wait=False, cancel_futures=True)
        st.shards.close()

    return lifespan


async def _call(st: _State, batcher: MicroBatcher, items: list) -> list:
    """Items through a batcher, bounded by the request timeout (504) and queue (429)."""
    if st.ready().dim is None:
        raise ApiError(
            404,
            "this run's task does not embed images and texts (no /v1/embed, "
            "/v1/classify or /v1/search); see /v1/predict/<task>",
        )
    try:
        return await asyncio.wait_for(batcher.submit(items), st.cfg.request_timeout_s)
    except Overloaded as e:
        raise ApiError(429, str(e)) from None
    except asyncio.TimeoutError:
        raise ApiError(504, f"the model took longer than {st.cfg.request_timeout_s} s") from None
    except ApiError:
        raise
    except Exception:
        raise ApiError(500, "the model failed on this request; see the server log") from None


async def _json(request: Request, model: type[BaseModel]):
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(422, "the body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            raise ApiError(422, f"unknown field '{loc}' (fields: {list(model.model_fields)})") from None
        raise ApiError(422, f"field '{loc}': {first['msg']}") from None


async def _form(request: Request, allowed: set[str]):
    form = await request.form(max_files=1, max_fields=len(allowed) + 64, max_part_size=2**20)
    unknown = sorted(set(form.keys()) - allowed)
    if unknown:
        raise ApiError(422, f"unknown form field(s) {unknown} (fields: {sorted(allowed)})")
    return form


async def _pixels(st: _State, form) -> np.ndarray:
    """The `image` upload decoded (bounded) and prepared → (3, S, S)."""
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "send the image as a multipart file field named 'image'")
    data = await upload.read()
    backend = st.ready()

    def prepare():
        return backend.preprocess(decode_upload(data, st.cfg.max_image_pixels))

    return await run_in_threadpool(prepare)


async def _clip(st: _State, form) -> tuple[np.ndarray, np.ndarray]:
    """The `video` upload probed and decoded (bounded: size, duration, frame pixels) → its frames and mask."""
    backend = st.ready()
    if backend.video_task is None:
        raise ApiError(404, "this run's task does not embed videos; train it with task video-contrastive")
    upload = form.get("video")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "send the video as a multipart file field named 'video'")
    data = await upload.read()
    if not data:
        raise ApiError(422, "the uploaded video is empty")

    def prepare():
        try:
            return backend.prepare_video(data, st.cfg.max_video_seconds, st.cfg.max_image_pixels)
        except BadImage as e:
            raise video_error(e) from None

    return await run_in_threadpool(prepare)


def _kind(request: Request) -> str:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        return "form"
    if ctype.startswith("application/json"):
        return "json"
    raise ApiError(415, "send application/json (texts) or multipart/form-data (an image)")


def _labels(form, limit: int, max_chars: int) -> list[str]:
    values = form.getlist("labels")
    if len(values) == 1 and str(values[0]).lstrip().startswith("["):
        try:
            values = json.loads(values[0])
        except json.JSONDecodeError:
            raise ApiError(422, "'labels' is not a valid JSON list") from None
    return check_texts([v if isinstance(v, str) else "" for v in values], limit, max_chars, "labels")


def _k(value, limit: int) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ApiError(422, f"k must be an integer (got {value!r})") from None
    if k < 1:
        raise ApiError(422, "k must be at least 1")
    if k > limit:
        raise ApiError(422, f"k={k} is more than the limit of {limit}")
    return k


def _routes(app: FastAPI, st: _State, api_key: str | None) -> None:
    cfg = st.cfg

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready():
        if st.backend is None or st.error:
            return JSONResponse({"status": "not ready", "error": st.error or "loading"}, 503)
        return {"status": "ready"}

    @app.get("/healthz")
    async def healthz():
        ok = st.backend is not None and not st.error
        body = {
            "status": "ok" if ok else "unavailable",
            "error": st.error,
            "model": st.backend.name if st.backend else None,
            "index_rows": len(st.backend.index) if st.backend and st.backend.index else 0,
            "batching": {
                "text": st.text.stats.as_dict(),
                "image": st.image.stats.as_dict(),
                "video": st.video.stats.as_dict(),
            },
            "requests": st.flight.stats.as_dict() if st.flight else {},
            "limits": cfg.model_dump(include={"max_batch_size", "max_queue", "max_in_flight", "max_waiting"}),
        }
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    def auth(request: Request) -> None:
        check_key(request.headers.get("authorization"), api_key)

    @app.post("/v1/embed")
    async def embed(request: Request):
        auth(request)
        if _kind(request) == "json":
            req = await _json(request, EmbedRequest)
            texts = check_texts(req.texts, cfg.max_texts, cfg.max_text_chars)
            vecs = await _call(st, st.text, texts)
        else:
            form = await _form(request, {"image", "video"})
            if "video" in form:
                vecs = await _call(st, st.video, [await _clip(st, form)])
            else:
                vecs = await _call(st, st.image, [await _pixels(st, form)])
        # JSONResponse: json.dumps directly, not FastAPI's slow per-float jsonable_encoder
        return JSONResponse({"embeddings": [v.tolist() for v in vecs], "dim": int(len(vecs[0]))})

    @app.post("/v1/classify")
    async def classify(request: Request):
        auth(request)
        if _kind(request) != "form":
            raise ApiError(415, "send multipart/form-data with an 'image' file and 'labels'")
        form = await _form(request, {"image", "labels"})
        backend = st.ready()
        if form.getlist("labels") or backend.class_weights is None:
            labels = _labels(form, cfg.max_labels, cfg.max_text_chars)
            pixels = await _pixels(st, form)
            img, txt = await asyncio.gather(_call(st, st.image, [pixels]), _call(st, st.text, labels))
            weights = np.stack(txt)
        else:  # no labels: the run's classes through its prompt templates (its zero-shot head)
            labels, weights = backend.classes, backend.class_weights
            img = await _call(st, st.image, [await _pixels(st, form)])
        logits = backend.scale() * (weights @ img[0])  # (L,)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = labels[int(probs.argmax())]
        return JSONResponse({"labels": labels, "probs": probs.tolist(), "label": best})

    @app.post("/v1/search")
    async def search(request: Request):
        auth(request)
        backend = st.ready()
        if backend.index is None:
            raise ApiError(404, "no index is loaded: start the server with --index DIR")
        if _kind(request) == "json":
            req = await _json(request, SearchRequest)
            k = _k(min(10, cfg.max_k) if req.k is None else req.k, cfg.max_k)
            (text,) = check_texts([req.text], 1, cfg.max_text_chars, "text")
            vec = (await _call(st, st.text, [text]))[0]
        else:
            form = await _form(request, {"image", "k"})
            k = _k(form.get("k", min(10, cfg.max_k)), cfg.max_k)
            vec = (await _call(st, st.image, [await _pixels(st, form)]))[0]
        hits = (await run_in_threadpool(backend.index.search, vec[None], k))[0]
        for h in hits:
            h["image_url"] = f"/v1/images/{h['row']}" if h["modality"] == "image" else None
        return JSONResponse({"results": hits})

    @app.get("/v1/images/{row}")
    async def image(row: int, request: Request):
        auth(request)
        backend = st.ready()
        index = backend.index
        if index is None or not 0 <= row < len(index) or index.meta["modality"][row] != "image":
            raise ApiError(404, f"no image at index row {row}")
        raw = index.meta["path"][row] or ""
        parts = shard_member(raw)
        if parts:  # an image inside a tar shard (`mmtune data shard`)
            try:
                data = await run_in_threadpool(st.shards.read_member, raw, parts)
            except (BadImage, OSError, tarfile.TarError) as e:
                raise ApiError(404, f"the image of row {row} is no longer in its shard") from e
            kind = mimetypes.guess_type(parts[1])[0]
            return Response(data, media_type=kind or "application/octet-stream")
        path = Path(raw)
        if not path.is_file():
            raise ApiError(404, f"the image of row {row} is no longer on disk")
        return FileResponse(path)

    _predict_route(app, st, auth)
    chat_routes(app, st, auth)


def _predict_route(app: FastAPI, st: _State, auth) -> None:
    """POST /v1/predict/<task>: an 'image' upload + 'inputs' (a JSON object) → task.predict."""

    @app.post("/v1/predict/{name}", name="predict")
    async def predict(name: str, request: Request):
        auth(request)
        backend = st.ready()
        if name not in backend.tasks:
            raise ApiError(404, f"task {name!r} is not served (served: {sorted(backend.tasks)})")
        form = await _form(request, {"image", "inputs"})
        try:
            inputs = json.loads(form.get("inputs") or "{}")
        except json.JSONDecodeError:
            raise ApiError(422, "'inputs' is not valid JSON") from None
        if not isinstance(inputs, dict) or "image" in inputs:
            raise ApiError(422, "'inputs' must be a JSON object (the image is the upload)")
        upload = form.get("image")
        if isinstance(upload, UploadFile):
            data = await upload.read()
            inputs["image"] = await run_in_threadpool(decode_upload, data, st.cfg.max_image_pixels)
        call = asyncio.get_running_loop().run_in_executor(st.executor, backend.predict, name, [inputs])
        try:
            out = await asyncio.wait_for(call, st.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the model took longer than {st.cfg.request_timeout_s} s") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ApiError(422, f"task {name!r} cannot use these inputs ({e!r})") from None
        return {"task": name, "outputs": out}


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(error_json(exc.status, exc.message, request.url.path, exc.code), exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(error_json(exc.status_code, str(exc.detail), request.url.path), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        msg = f"{'.'.join(str(x) for x in first.get('loc', []))}: {first.get('msg', 'invalid')}"
        return JSONResponse(error_json(422, msg, request.url.path), 422)


def create_app(source: Backend | Callable[[], Backend], cfg: ServeConfig | None = None, api_key=None):
    """The ASGI app serving `source` (a Backend, or a function loading one at start-up)."""
    cfg = cfg or ServeConfig()
    st = _State(cfg)
    app = FastAPI(title="mmtune", lifespan=_lifespan(st, source), docs_url="/docs")
    app.state.mmtune = st
    _handlers(app)
    _routes(app, st, api_key)
    st.flight = InFlightLimit(app, cfg.max_in_flight, cfg.max_waiting, cfg.request_timeout_s)
    return BodySizeLimit(st.flight, cfg.max_body_bytes)
