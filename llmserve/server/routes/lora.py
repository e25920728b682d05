"""LoRA adapters of a loaded model: GET/POST /lora-adapters (llama-server's contract: list
them; set their global scales) and POST /v1/lora/load, /v1/lora/unload at run time.

The model is the one ``model`` names (query parameter on /lora-adapters, body field on
/v1/lora/*), else the server's default. Loading proves the adapter in a child process first
(engine/lora.py), off the event loop; a bad adapter is a 400 and the model keeps serving.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llmserve.engine.types import EngineProtocol, LoraAdapter
from llmserve.errors import InvalidRequest
from llmserve.protocol.lora import LoadLoraRequest, ScalesRequest, UnloadLoraRequest
from llmserve.server.generation import borrowed
from llmserve.server.requests import invalid_from, parse, read_json
from llmserve.server.state import AppState


def _body(adapters: list[LoraAdapter]) -> list[dict[str, object]]:
    return [{"id": a.id, "path": a.path, "scale": a.scale} for a in adapters]


async def list_adapters(request: Request) -> JSONResponse:
    host = AppState.of(request).host
    adapters = await borrowed(host, lambda e: e.lora_adapters(),
                              request.query_params.get("model"))
    return JSONResponse(_body(adapters))


async def set_scales(request: Request) -> JSONResponse:
    data = await read_json(request)
    model = request.query_params.get("model")
    if isinstance(data, dict):  # {"model", "adapters"} also names the model
        model = str(data["model"]) if data.get("model") else model
        data = data.get("adapters")  # type: ignore[assignment]
    try:
        entries = ScalesRequest.model_validate(data).root
    except ValidationError as exc:
        raise invalid_from(exc) from None
    scales = {e.id: e.scale for e in entries}

    def work(engine: EngineProtocol) -> list[LoraAdapter]:
        engine.set_lora_scales(scales)
        return engine.lora_adapters()

    host = AppState.of(request).host
    adapters = await borrowed(host, work, model)
    return JSONResponse({"success": True, "adapters": _body(adapters)})


async def load(request: Request) -> JSONResponse:
    req = await parse(request, LoadLoraRequest)
    host = AppState.of(request).host
    adapter = await borrowed(host, lambda e: e.load_lora(req.path, req.scale), req.model)
    return JSONResponse(_body([adapter])[0])


async def unload(request: Request) -> JSONResponse:
    req = await parse(request, UnloadLoraRequest)

    def work(engine: EngineProtocol) -> int:
        adapter_id = req.id if req.id is not None else _by_path(engine, req.path or "")
        engine.unload_lora(adapter_id)
        return adapter_id

    host = AppState.of(request).host
    adapter_id = await borrowed(host, work, req.model)
    return JSONResponse({"success": True, "id": adapter_id})


def _by_path(engine: EngineProtocol, path: str) -> int:
    resolved = str(Path(path).expanduser().resolve())
    for adapter in engine.lora_adapters():
        if adapter.path == resolved:
            return adapter.id
    raise InvalidRequest(f"no LoRA adapter loaded from {path}", param="path")


routes = [
    Route("/lora-adapters", list_adapters, methods=["GET"]),
    Route("/lora-adapters", set_scales, methods=["POST"]),
    Route("/v1/lora/load", load, methods=["POST"]),
    Route("/v1/lora/unload", unload, methods=["POST"]),
]
