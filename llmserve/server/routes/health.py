"""GET /health: 200 when a model is loaded, 503 with the reason (loading, no_model)
otherwise; both name the loaded and loading models."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llmserve.server.state import AppState


async def health(request: Request) -> JSONResponse:
    host = AppState.of(request).host
    state = host.state
    models = {"loaded": [s.spec.id for s in host.statuses() if s.state == "loaded"],
              "loading": host.loading}
    if state == "ready":
        body: dict[str, object] = {"status": "ok", "models": models}
        admission = host.admission
        if admission is not None:
            body["slots_busy"] = min(admission.in_system, admission.parallel)
            body["queued"] = admission.waiting
        return JSONResponse(body)
    headers = {"Retry-After": "5"}
    return JSONResponse({"status": state, "models": models}, status_code=503, headers=headers)


routes = [Route("/health", health, methods=["GET"]), Route("/v1/health", health, methods=["GET"])]
