"""OpenAI Batches: POST /v1/batches, GET /v1/batches, GET /v1/batches/{id},
POST /v1/batches/{id}/cancel. The lines run in ``server.batches.BatchRunner``.

The input file is checked whole before the batch exists: a line that is not a JSON object
with a unique ``custom_id``, ``method`` POST, the batch's ``url`` and an object ``body`` is a
400 naming the line, so a client learns of a malformed file at once rather than from a failed
batch later.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Match, Route

from llmserve.errors import InvalidRequest, NotFound
from llmserve.ids import object_id
from llmserve.protocol import openai as oa
from llmserve.server.batches import ACTIVE, ENDPOINTS, BatchRunner
from llmserve.server.requests import parse
from llmserve.server.routes.files import known_file, store_of
from llmserve.server.state import AppState
from llmserve.store import Store

COMPLETION_WINDOWS = ("24h",)
# how many bad lines one error message names
MAX_LINE_ERRORS = 5


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input_file_id: str = Field(min_length=1)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def _runner(request: Request) -> BatchRunner:
    runner = AppState.of(request).batches
    assert runner is not None, "a server with a store has a batch runner"
    return runner


def _served(request: Request, path: str) -> bool:
    scope = {"type": "http", "method": "POST", "path": path}
    return any(route.matches(scope)[0] == Match.FULL for route in request.app.routes)


def read_lines(store: Store, file_id: str, endpoint: str) -> list[tuple[int, str, dict[str, Any]]]:
    """The input file's requests as (line number, custom_id, body); raises InvalidRequest
    naming the first bad lines."""
    lines: list[tuple[int, str, dict[str, Any]]] = []
    errors: list[str] = []
    seen: set[str] = set()
    with open(store.file_path(file_id), "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            problem = None
            try:
                line = json.loads(raw, parse_constant=_no_constant)
            except (ValueError, UnicodeDecodeError):
                problem = "not valid JSON"
            else:
                problem = _line_problem(line, endpoint, seen)
            if problem is not None:
                errors.append(f"line {number}: {problem}")
                if len(errors) >= MAX_LINE_ERRORS:
                    break
                continue
            seen.add(line["custom_id"])
            lines.append((number, line["custom_id"], line["body"]))
    if errors:
        raise InvalidRequest(f"the input file {file_id} is not valid batch input: "
                             + "; ".join(errors), param="input_file_id")
    if not lines:
        raise InvalidRequest(f"the input file {file_id} holds no requests",
                             param="input_file_id")
    return lines


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _line_problem(line: Any, endpoint: str, seen: set[str]) -> str | None:
    if not isinstance(line, dict):
        return "not a JSON object"
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "'custom_id' must be a non-empty string"
    if custom_id in seen:
        return f"custom_id {custom_id!r} is used more than once"
    if line.get("method") != "POST":
        return "'method' must be \"POST\""
    if line.get("url") != endpoint:
        return f"'url' must be the batch's endpoint {endpoint!r}, got {line.get('url')!r}"
    if not isinstance(line.get("body"), dict):
        return "'body' must be a JSON object"
    return None


async def create(request: Request) -> JSONResponse:
    req = await parse(request, CreateBatchRequest)
    store = store_of(request)
    if req.endpoint not in ENDPOINTS:
        raise InvalidRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}; got "
                             f"{req.endpoint!r}", param="endpoint")
    if not _served(request, req.endpoint):
        raise InvalidRequest(f"this server does not serve {req.endpoint}", param="endpoint")
    if req.completion_window not in COMPLETION_WINDOWS:
        raise InvalidRequest("completion_window must be \"24h\"", param="completion_window")
    known_file(store, req.input_file_id, "input_file_id")
    lines = read_lines(store, req.input_file_id, req.endpoint)
    created = oa.now()
    batch: dict[str, Any] = {
        "id": object_id("batch"), "object": "batch", "endpoint": req.endpoint, "errors": None,
        "input_file_id": req.input_file_id, "completion_window": req.completion_window,
        "status": "validating", "output_file_id": None, "error_file_id": None,
        "created_at": created, "in_progress_at": None, "expires_at": created + 24 * 3600,
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
        "metadata": req.metadata or {},
    }
    store.put_batch(batch, lines)
    _runner(request).wake()
    return JSONResponse(batch)


def _known(store: Store, batch_id: str) -> dict[str, Any]:
    found = store.get_batch(batch_id)
    if found is None:
        raise NotFound(f"no batch with id {batch_id!r}")
    return found


async def retrieve(request: Request) -> JSONResponse:
    return JSONResponse(_known(store_of(request), request.path_params["batch_id"]))


async def list_batches(request: Request) -> JSONResponse:
    batches = store_of(request).list_batches()
    try:
        limit = int(request.query_params.get("limit", "20"))
    except ValueError:
        raise InvalidRequest("limit must be a whole number", param="limit") from None
    after = request.query_params.get("after")
    if after:
        ids = [b["id"] for b in batches]
        batches = batches[ids.index(after) + 1:] if after in ids else []
    page = batches[:max(1, limit)]
    return JSONResponse({"object": "list", "data": page, "has_more": len(batches) > len(page),
                         "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None})


async def cancel(request: Request) -> JSONResponse:
    batch = _known(store_of(request), request.path_params["batch_id"])
    if batch["status"] not in ACTIVE:
        raise InvalidRequest(f"the batch is {batch['status']}; only a batch in progress can be "
                             "cancelled", param="batch_id")
    if batch["status"] == "cancelling":
        return JSONResponse(batch)
    return JSONResponse(_runner(request).cancel(batch))


routes = [
    Route("/v1/batches", create, methods=["POST"]),
    Route("/v1/batches", list_batches, methods=["GET"]),
    Route("/v1/batches/{batch_id}", retrieve, methods=["GET"]),
    Route("/v1/batches/{batch_id}/cancel", cancel, methods=["POST"]),
]
