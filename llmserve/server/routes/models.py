"""GET /v1/models, GET /v1/models/{id}, POST /v1/models/load, POST /v1/models/unload."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llmserve.engine.types import ModelInfo
from llmserve.errors import ModelNotFound
from llmserve.protocol import openai as oa
from llmserve.server.requests import parse
from llmserve.server.state import AppState


def model_card(info: ModelInfo) -> oa.ModelCard:
    return oa.ModelCard.model_validate({
        "id": info.id,
        "created": info.created,
        "owned_by": "llmserve",
        "state": "loaded",
        "path": info.path,
        "n_ctx": info.n_ctx,
        "n_ctx_train": info.n_ctx_train,
        "parallel": info.n_parallel,
        "size_bytes": info.size_bytes,
        "n_params": info.n_params,
    })


async def list_models(request: Request) -> JSONResponse:
    engine = AppState.of(request).host.engine
    cards = [model_card(engine.info)] if engine else []
    return JSONResponse(oa.dump(oa.ModelList(data=cards)))


async def get_model(request: Request) -> JSONResponse:
    model_id = request.path_params["model_id"]
    engine = AppState.of(request).host.engine
    if engine is None or model_id != engine.info.id:
        known = [engine.info.id] if engine else []
        raise ModelNotFound(f"model {model_id!r} is not loaded; loaded: {known}", param="model")
    return JSONResponse(oa.dump(model_card(engine.info)))


async def load_model(request: Request) -> JSONResponse:
    host = AppState.of(request).host
    req = await parse(request, oa.LoadModelRequest)
    current = host.engine
    if current is not None and req.model in (current.info.id, current.info.path):
        return JSONResponse({"status": "loaded", "model": oa.dump(model_card(current.info))})
    engine = await host.load(req.model)
    return JSONResponse({"status": "loaded", "model": oa.dump(model_card(engine.info))})


async def unload_model(request: Request) -> JSONResponse:
    host = AppState.of(request).host
    req = await parse(request, oa.UnloadModelRequest) if await request.body() else None
    current = host.engine
    if req is not None and req.model and current is not None and req.model != current.info.id:
        raise ModelNotFound(f"model {req.model!r} is not loaded", param="model")
    unloaded = await host.unload()
    return JSONResponse({"status": "unloaded" if unloaded else "no_model"})


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/v1/models/load", load_model, methods=["POST"]),
    Route("/v1/models/unload", unload_model, methods=["POST"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
]
