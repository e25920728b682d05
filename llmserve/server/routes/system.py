"""GET /system/info: the machine, its GPUs, what this llama.cpp build can do (its devices,
RPC servers included), and where each loaded model's layers are."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llmserve.server.state import AppState
from llmserve.system_info import machine_info


def _collect() -> dict[str, Any]:
    from llmserve.engine.model import build_info

    return {**machine_info(), "llama_cpp": build_info()}


async def system_info(request: Request) -> JSONResponse:
    body = await anyio.to_thread.run_sync(_collect)
    body["models"] = [
        {"id": s.info.id, "n_layer": s.info.n_layer, "layers_offloaded": s.info.layers_offloaded,
         "layers": dict(s.info.layer_devices), "rpc_servers": list(s.info.rpc_servers)}
        for s in AppState.of(request).host.statuses() if s.info is not None
    ]
    return JSONResponse(body)


routes = [Route("/system/info", system_info, methods=["GET"])]
