"""GET /health: the state of every model the server knows of that is loaded or loading.

200 while the loaded models all work and the server takes requests; 503 with the reason
otherwise: ``draining`` (SIGTERM received: a load balancer must stop sending at once, while
requests in flight finish), ``failed`` (a loaded model's engine died; ``failed`` names it and
each model's ``error`` says why), ``loading`` or ``no_model``. ``slots_busy`` and
``queued`` are totals over the loaded models; ``models`` has each one's own."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llmserve.registry import ModelStatus
from llmserve.server.state import AppState


def _model(status: ModelStatus) -> dict[str, object]:
    body: dict[str, object] = {
        "id": status.spec.id, "state": "failed" if status.failed else "ready",
        "slots": status.slots, "slots_busy": status.slots_busy, "queued": status.queued,
    }
    if status.error is not None:
        body["error"] = status.error
    return body


async def health(request: Request) -> JSONResponse:
    state = AppState.of(request)
    host = state.host
    loaded = [s for s in host.statuses() if s.state == "loaded"]
    # host.loading, not the statuses: a model loaded by path is known only once it has loaded
    loading = host.loading
    failed = [s.spec.id for s in loaded if s.failed]
    body: dict[str, object] = {
        "status": "ok",
        "models": [_model(s) for s in loaded] + [{"id": m, "state": "loading"} for m in loading],
        "slots_busy": sum(s.slots_busy for s in loaded),
        "queued": sum(s.queued for s in loaded),
    }
    if state.drain.draining:
        body["status"] = "draining"
    elif failed:
        body["status"] = "failed"
        body["failed"] = failed
    elif not loaded:
        body["status"] = "loading" if loading else "no_model"
    else:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


routes = [Route("/health", health, methods=["GET"]), Route("/v1/health", health, methods=["GET"])]
