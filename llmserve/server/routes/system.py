"""GET /system/info: the machine, its GPUs, and what this llama.cpp build can do."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llmserve.system_info import machine_info


def _collect() -> dict[str, Any]:
    from llmserve.engine.model import build_info

    return {**machine_info(), "llama_cpp": build_info()}


async def system_info(_request: Request) -> JSONResponse:
    return JSONResponse(await anyio.to_thread.run_sync(_collect))


routes = [Route("/system/info", system_info, methods=["GET"])]
