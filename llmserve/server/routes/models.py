"""The models the server knows and their state, in each client family's shape.

OpenAI (+ extra fields): GET /v1/models, GET /v1/models/{id}; load/unload: POST /v1/models/load,
POST /v1/models/unload. Seed names: GET /models, GET /models/available, GET /models/current,
POST /models/load, POST /models/unload. LM Studio: GET /api/v0/models, GET /api/v0/models/{id}.
Ollama: GET /api/ps (loaded models and when they expire).

Listings read each GGUF's header (cached) off the event loop; a file that cannot be read is
listed with an ``error`` instead of failing the listing.
"""

from __future__ import annotations

import datetime
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llmserve.errors import LlmserveError
from llmserve.gguf_info import GgufInfo, read_gguf_cached
from llmserve.protocol import openai as oa
from llmserve.registry import ModelHost, ModelStatus
from llmserve.server.requests import parse
from llmserve.server.state import AppState


@dataclass(frozen=True)
class ModelView:
    """A model's status plus what its GGUF header says (or why it could not be read)."""

    status: ModelStatus
    gguf: GgufInfo | None
    error: str | None

    @property
    def id(self) -> str:
        return self.status.spec.id

    @property
    def context_length(self) -> int | None:
        if self.gguf is not None and self.gguf.context_length:
            return self.gguf.context_length
        return self.status.info.n_ctx_train if self.status.info else None

    @property
    def size(self) -> int:
        if self.gguf is not None:
            return self.gguf.file_size
        return self.status.info.size_bytes if self.status.info else 0


def _view(status: ModelStatus) -> ModelView:
    try:
        return ModelView(status, read_gguf_cached(status.spec.path), None)
    except LlmserveError as exc:
        return ModelView(status, None, exc.message)


async def views(host: ModelHost, statuses: list[ModelStatus] | None = None) -> list[ModelView]:
    todo = host.statuses() if statuses is None else statuses
    return await anyio.to_thread.run_sync(lambda: [_view(s) for s in todo])


# -- OpenAI shape (+ llmserve's fields) ----------------------------------------------------------


def model_card(view: ModelView) -> oa.ModelCard:
    status, gguf, info = view.status, view.gguf, view.status.info
    extra: dict[str, Any] = {
        "state": status.state,
        "path": str(status.spec.path),
        "aliases": status.spec.aliases,
        "arch": gguf.architecture if gguf else None,
        "quantization": gguf.quantization if gguf else None,
        "n_params": gguf.parameter_count if gguf else (info.n_params if info else None),
        "n_ctx_train": view.context_length,
        "size_bytes": view.size,
        "has_chat_template": gguf.chat_template is not None if gguf else None,
    }
    if info is not None:
        extra |= {"n_ctx": info.n_ctx, "parallel": info.n_parallel}
    if view.error is not None:
        extra["error"] = view.error
    created = info.created if info else _mtime(status)
    return oa.ModelCard(id=view.id, created=created, owned_by="llmserve", **extra)


def _mtime(status: ModelStatus) -> int:
    try:
        return int(status.spec.path.stat().st_mtime)
    except OSError:
        return 0


async def list_models(request: Request) -> JSONResponse:
    cards = [model_card(v) for v in await views(AppState.of(request).host)]
    return JSONResponse(oa.dump(oa.ModelList(data=cards)))


async def current_models(request: Request) -> JSONResponse:
    host = AppState.of(request).host
    loaded = [s for s in host.statuses() if s.state == "loaded"]
    cards = [model_card(v) for v in await views(host, loaded)]
    return JSONResponse(oa.dump(oa.ModelList(data=cards)))


async def get_model(request: Request) -> JSONResponse:
    host = AppState.of(request).host
    return JSONResponse(oa.dump(model_card(await _one(host, request))))


async def _one(host: ModelHost, request: Request) -> ModelView:
    spec = host.lookup(request.path_params["model_id"])
    status = next(s for s in host.statuses() if s.spec.id == spec.id)
    return (await views(host, [status]))[0]


async def load_model(request: Request) -> JSONResponse:
    host = AppState.of(request).host
    req = await parse(request, oa.LoadModelRequest)
    t0 = time.monotonic()
    engine = await host.load(req.model)
    status = next(s for s in host.statuses() if s.spec.id == engine.info.id)
    card = model_card((await views(host, [status]))[0])
    return JSONResponse({"status": "loaded", "model": oa.dump(card),
                         "load_time_s": round(time.monotonic() - t0, 3)})


async def unload_model(request: Request) -> JSONResponse:
    host = AppState.of(request).host
    req = await parse(request, oa.UnloadModelRequest) if (await request.body()).strip() else None
    unloaded = await host.unload(req.model if req is not None else None)
    return JSONResponse({"status": "unloaded" if unloaded else "no_model"})


# -- LM Studio -----------------------------------------------------------------------------------


def _embeds(view: ModelView) -> bool:
    """Loaded: what it was loaded as; else as its configuration and GGUF say."""
    if view.status.info is not None:
        return view.status.info.embedding is not None
    try:
        return view.status.spec.serves_embeddings()
    except LlmserveError:  # an unreadable file is listed, not an error here
        return False


def lmstudio_card(view: ModelView) -> dict[str, Any]:
    gguf, info = view.gguf, view.status.info
    arch = gguf.architecture if gguf else None
    publisher = gguf.metadata.get("general.organization") if gguf else None
    card: dict[str, Any] = {
        "id": view.id,
        "object": "model",
        "type": "embeddings" if _embeds(view) else "llm",
        "publisher": publisher if isinstance(publisher, str) else "local",
        "arch": arch,
        "compatibility_type": "gguf",
        "quantization": gguf.quantization if gguf else None,
        "state": "loaded" if view.status.state == "loaded" else "not-loaded",
        "max_context_length": view.context_length,
    }
    if info is not None:
        card["loaded_context_length"] = info.n_ctx
    if view.error is not None:
        card["error"] = view.error
    return card


async def lmstudio_models(request: Request) -> JSONResponse:
    data = [lmstudio_card(v) for v in await views(AppState.of(request).host)]
    return JSONResponse({"object": "list", "data": data})


async def lmstudio_model(request: Request) -> JSONResponse:
    return JSONResponse(lmstudio_card(await _one(AppState.of(request).host, request)))


# -- Ollama --------------------------------------------------------------------------------------

FOREVER = "9999-12-31T23:59:59Z"


def iso_time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")


def parameter_size(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + unit
    return str(n)


def ollama_details(view: ModelView) -> dict[str, Any]:
    gguf, info = view.gguf, view.status.info
    arch = gguf.architecture if gguf else None
    n_params = gguf.parameter_count if gguf else (info.n_params if info else 0)
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch or "",
        "families": [arch] if arch else [],
        "parameter_size": parameter_size(n_params),
        "quantization_level": gguf.quantization if gguf else "",
    }


def ollama_digest(view: ModelView) -> str:
    """Ollama's digest is the sha256 of a model's manifest. A GGUF here has none, and hashing
    gigabytes for every listing is too slow: the sha256 of the file's path, size and mtime
    names this version of the file instead (it changes when the file does)."""
    path = view.status.spec.path
    try:
        st = path.stat()
        key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    except OSError:
        key = str(path)
    return hashlib.sha256(key.encode()).hexdigest()


def ollama_ps_entry(view: ModelView) -> dict[str, Any]:
    status, info = view.status, view.status.info
    assert info is not None  # loaded models only
    if status.expires_at is not None:
        expires = iso_time(status.expires_at)
    elif status.keep_alive is None:
        expires = FOREVER
    else:  # in use: the countdown starts when its requests finish
        expires = iso_time(time.time() + status.keep_alive)
    offloaded = info.layers_offloaded / (info.n_layer + 1) if info.n_layer >= 0 else 0.0
    return {
        "name": view.id,
        "model": view.id,
        "size": view.size,
        "digest": ollama_digest(view),
        "details": ollama_details(view),
        "expires_at": expires,
        "size_vram": int(view.size * offloaded),
        "context_length": info.n_ctx,
    }


async def ollama_ps(request: Request) -> JSONResponse:
    host = AppState.of(request).host
    loaded = [s for s in host.statuses() if s.state == "loaded"]
    return JSONResponse({"models": [ollama_ps_entry(v) for v in await views(host, loaded)]})


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/models/available", list_models, methods=["GET"]),
    Route("/models/current", current_models, methods=["GET"]),
    Route("/v1/models/load", load_model, methods=["POST"]),
    Route("/models/load", load_model, methods=["POST"]),
    Route("/v1/models/unload", unload_model, methods=["POST"]),
    Route("/models/unload", unload_model, methods=["POST"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/api/v0/models", lmstudio_models, methods=["GET"]),
    Route("/api/v0/models/{model_id:path}", lmstudio_model, methods=["GET"]),
    Route("/api/ps", ollama_ps, methods=["GET"]),
]
