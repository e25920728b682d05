"""The OpenAI Responses API: POST /v1/responses (plain, streamed as typed events, or in the
background), GET/DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items and
POST /v1/responses/{id}/cancel.

A turn's conversation is the stored ``context`` of ``previous_response_id`` (every earlier
input and output, as chat messages) + this turn's input; ``instructions`` go first as a system
message and, as in OpenAI's API, are not carried to the next turn. The conversation is rendered
with the model's chat template, so a follow-up turn's prompt starts with the previous one and
the slots' prefix cache serves it (``usage.input_tokens_details.cached_tokens``).

Output items are built by ``Turn``: today one ``message`` with one ``output_text`` part;
``function_call`` items join the same ``output`` list when function tools land.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmserve.engine.types import EngineProtocol, Finish, TokenEvent
from llmserve.errors import InvalidRequest, LlmserveError, NotFound, StoreDisabled
from llmserve.ids import object_id
from llmserve.params import Params, normalise
from llmserve.protocol import openai as oa
from llmserve.protocol import responses as rp
from llmserve.server import sse
from llmserve.server.errors import error_payload
from llmserve.server.generation import (
    Generation,
    Owner,
    collect,
    collect_or_abandon,
    relay,
    start,
)
from llmserve.server.requests import parse
from llmserve.server.state import AppState
from llmserve.store import Store

# Background responses a restart found unfinished end as failed with this message.
RESTARTED = "the server restarted before this background response finished; create it again"


@dataclass
class Turn:
    """One response being made: what the request asked, and the response object it becomes."""

    id: str
    created_at: int
    req: rp.ResponsesRequest
    params: Params
    items: list[dict[str, Any]]
    history: list[dict[str, Any]]
    stored: bool
    model: str = ""
    message_id: str = field(default_factory=lambda: object_id("msg"))

    def messages(self) -> list[dict[str, Any]]:
        """The conversation for the chat template."""
        system = ([{"role": "system", "content": self.req.instructions}]
                  if self.req.instructions else [])
        return [*system, *self.history, *(_as_message(i) for i in self.items)]

    def context(self, text: str) -> list[dict[str, Any]]:
        """What the next turn starts from: everything before, this input, this answer."""
        return [*self.history, *(_as_message(i) for i in self.items),
                {"role": "assistant", "content": text}]

    def body(self, status: str, output: list[dict[str, Any]] | None = None, *,
             usage: dict[str, Any] | None = None, error: LlmserveError | None = None,
             incomplete: str | None = None) -> dict[str, Any]:
        client = self.params.client
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": self.req.background,
            "error": None if error is None else {"code": error.code or error.type,
                                                 "message": error.message},
            "incomplete_details": None if incomplete is None else {"reason": incomplete},
            "instructions": self.req.instructions,
            "max_output_tokens": self.req.max_output_tokens,
            "model": self.model or self.req.model or "",
            "output": output or [],
            "parallel_tool_calls": True,
            "previous_response_id": self.req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": self.stored,
            "temperature": client.get("temperature"),
            "text": {"format": self.req.text_format()},
            "tool_choice": "auto",
            "tools": [],
            "top_p": client.get("top_p"),
            "truncation": "disabled",
            "usage": usage,
            "user": self.req.user,
            "metadata": self.req.metadata or {},
        }

    def message(self, text: str, status: str) -> dict[str, Any]:
        return {"id": self.message_id, "type": "message", "status": status,
                "role": "assistant", "content": [] if status == "in_progress" else [
                    _output_text(text)]}

    def finished(self, text: str, finish: Finish) -> dict[str, Any]:
        """The response object once the generation has ended with ``finish``."""
        length = finish.reason == "length"
        status = "incomplete" if length else "completed"
        return self.body(status, [self.message(text, status)], usage=_usage(finish),
                         incomplete="max_output_tokens" if length else None)


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(finish: Finish) -> dict[str, Any]:
    return {
        "input_tokens": finish.prompt_tokens,
        "input_tokens_details": {"cached_tokens": finish.cached_tokens},
        "output_tokens": finish.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def _as_message(item: dict[str, Any]) -> dict[str, Any]:
    return {"role": item["role"], "content": "".join(p["text"] for p in item["content"])}


def input_items(req: rp.ResponsesRequest) -> list[dict[str, Any]]:
    """This turn's input as stored items (each with an id), text only."""
    raw = [rp.MessageItem(role="user", content=req.input)] if isinstance(req.input, str) \
        else req.input
    items: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        if not isinstance(item, rp.MessageItem):
            raise InvalidRequest(
                f"input items of type {item.type!r} are not supported by this server yet",
                param=f"input[{i}]")
        try:
            text = item.text()
        except ValueError as exc:
            raise InvalidRequest(str(exc), param=f"input[{i}].content") from None
        kind = "output_text" if item.role == "assistant" else "input_text"
        items.append({"id": object_id("msg"), "type": "message", "role": item.role,
                      "status": "completed", "content": [{"type": kind, "text": text}]})
    return items


def _store(state: AppState) -> Store:
    if state.store is None:
        raise StoreDisabled("this server runs with --no-store: responses are not kept")
    return state.store


def _stored(state: AppState, response_id: str, param: str | None = None) -> Any:
    found = _store(state).get_response(response_id)
    if found is None:
        raise NotFound(f"no response with id {response_id!r}", param=param)
    return found


def _save(state: AppState, turn: Turn, body: dict[str, Any], text: str) -> None:
    if turn.stored and state.store is not None:
        state.store.put_response(body, turn.items, turn.context(text))


async def create(request: Request) -> Response:
    state = AppState.of(request)
    req = await parse(request, rp.ResponsesRequest)
    params = normalise(req.wire())
    if req.background:
        _store(state)
        if not req.store:
            raise InvalidRequest("background responses must be stored: send store: true",
                                 param="background")
        if req.stream:
            raise InvalidRequest("background responses cannot be streamed; poll "
                                 "GET /v1/responses/{id}", param="stream")
    history: list[dict[str, Any]] = []
    if req.previous_response_id:
        history = _stored(state, req.previous_response_id, "previous_response_id").context
    turn = Turn(object_id("resp"), oa.now(), req, params, input_items(req), history,
                stored=req.store and state.store is not None)
    messages = turn.messages()

    def build(engine: EngineProtocol) -> list[int]:
        return engine.tokenize(engine.format_chat(messages), add_special=True)

    if req.background:
        body = turn.body("queued")
        _save(state, turn, body, "")
        state.background[turn.id] = asyncio.ensure_future(_run_background(state, turn, build))
        return JSONResponse(body)
    gen = await start(state.host, build, params, limits=state.limits, running=state.running,
                      owner=Owner.of(request))
    turn.model = gen.lease.engine.info.id
    if req.stream:
        return sse.EventStreamResponse(_events(state, turn, gen), on_close=gen.close)
    result = await collect_or_abandon(request, gen)
    if result is None:
        return Response(status_code=499)
    body = turn.finished(result.text, result.finish)
    _save(state, turn, body, result.text)
    return JSONResponse(body)


def _events(state: AppState, turn: Turn, gen: Generation) -> Any:
    """The typed event stream, in OpenAI's order, every event numbered."""
    numbers = itertools.count()
    where = {"item_id": turn.message_id, "output_index": 0, "content_index": 0}
    parts: list[str] = []

    def event(kind: str, **fields: Any) -> bytes:
        return sse.event({"type": kind, "sequence_number": next(numbers), **fields}, name=kind)

    opening = [
        event("response.created", response=turn.body("in_progress")),
        event("response.in_progress", response=turn.body("in_progress")),
        event("response.output_item.added", output_index=0,
              item=turn.message("", "in_progress")),
        event("response.content_part.added", **where, part=_output_text("")),
    ]

    def token(ev: TokenEvent) -> bytes | None:
        if not ev.text:
            return None
        parts.append(ev.text)
        return event("response.output_text.delta", **where, delta=ev.text, logprobs=[])

    def finish(fin: Finish) -> Iterable[bytes]:
        text = "".join(parts)
        body = turn.finished(text, fin)
        _save(state, turn, body, text)
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part=_output_text(text))
        yield event("response.output_item.done", output_index=0, item=body["output"][0])
        yield event(f"response.{body['status']}", response=body)

    def error(exc: Exception) -> bytes:
        failure = exc if isinstance(exc, LlmserveError) else None
        if failure is None:
            error_payload(exc)  # logs it
            failure = LlmserveError("internal server error; the server log has the details")
        body = turn.body("failed", error=failure)
        _save(state, turn, body, "".join(parts))
        return event("response.failed", response=body)

    return relay(gen, token, finish, error, opening=opening)


async def _run_background(state: AppState, turn: Turn,
                          build: Callable[[EngineProtocol], list[int]]) -> None:
    """A background response: generated detached, written to the store as it moves."""
    text = ""
    try:
        gen = await start(state.host, build, turn.params, limits=state.limits,
                          running=state.running)
        try:
            turn.model = gen.lease.engine.info.id
            _save(state, turn, turn.body("in_progress"), "")
            result = await collect(gen.stream)
        finally:
            gen.close()
        text = result.text
        body = turn.finished(text, result.finish)
    except asyncio.CancelledError:
        body = turn.body("cancelled")
    except LlmserveError as exc:
        body = turn.body("failed", error=exc)
    except Exception as exc:
        error_payload(exc)  # logs it
        body = turn.body("failed", error=LlmserveError("internal server error"))
    finally:
        state.background.pop(turn.id, None)
    _save(state, turn, body, text)


def fail_unfinished(store: Store) -> None:
    """At start: background responses a stopped server left queued or running end failed."""
    for found in store.responses_with_status("queued", "in_progress"):
        body = {**found.body, "status": "failed",
                "error": {"code": "server_error", "message": RESTARTED}}
        store.put_response(body, found.input_items, found.context)


async def retrieve(request: Request) -> JSONResponse:
    found = _stored(AppState.of(request), request.path_params["response_id"])
    return JSONResponse(found.body)


async def delete(request: Request) -> JSONResponse:
    state = AppState.of(request)
    response_id = request.path_params["response_id"]
    task = state.background.get(response_id)
    if task is not None:  # ended first, so that it cannot write the response back
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if not _store(state).delete_response(response_id):
        raise NotFound(f"no response with id {response_id!r}")
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


async def cancel(request: Request) -> JSONResponse:
    state = AppState.of(request)
    response_id = request.path_params["response_id"]
    found = _stored(state, response_id)
    if not found.body.get("background"):
        raise InvalidRequest("only responses created with background: true can be cancelled",
                             param="response_id")
    task = state.background.get(response_id)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        found = _stored(state, response_id)
    return JSONResponse(found.body)


async def list_input_items(request: Request) -> JSONResponse:
    found = _stored(AppState.of(request), request.path_params["response_id"])
    query = request.query_params
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'", param="order")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise InvalidRequest("limit must be a whole number", param="limit") from None
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit must be between 1 and 100", param="limit")
    items = found.input_items if order == "asc" else list(reversed(found.input_items))
    after = query.get("after")
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise NotFound(f"no input item with id {after!r}", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return JSONResponse({
        "object": "list", "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    })


routes = [
    Route("/v1/responses", create, methods=["POST"]),
    Route("/v1/responses/{response_id}", retrieve, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/cancel", cancel, methods=["POST"]),
    Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
]
