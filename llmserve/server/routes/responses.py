"""The OpenAI Responses API: POST /v1/responses (plain, streamed as typed events, or in the
background), GET/DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items and
POST /v1/responses/{id}/cancel.

A turn's conversation is the stored ``context`` of ``previous_response_id`` (every earlier
input and output, as chat messages) + this turn's input; ``instructions`` go first as a system
message and, as in OpenAI's API, are not carried to the next turn. The conversation is rendered
with the model's chat template, so a follow-up turn's prompt starts with the previous one and
the slots' prefix cache serves it (``usage.input_tokens_details.cached_tokens``).

Function tools (``tools``, ``tool_choice``, ``parallel_tool_calls``) and the reasoning split go
through ChatPlan, as on /v1/chat/completions; the answer's pieces become output items
(``reasoning``, ``message``, ``function_call``: server/response_output.py). Input items
``function_call`` and ``function_call_output`` become an assistant message's ``tool_calls`` and
``tool`` messages, so a client runs its tools and sends their outputs with
``previous_response_id``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmserve.engine.types import Finish, TokenEvent
from llmserve.errors import InvalidRequest, LlmserveError, NotFound, StoreDisabled
from llmserve.ids import object_id
from llmserve.params import Params, normalise
from llmserve.protocol import openai as oa
from llmserve.protocol import responses as rp
from llmserve.server import sse
from llmserve.server.chat_plan import ChatDefaults, ChatPlan
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
from llmserve.server.response_output import Event, ResponseOutput, chat_messages
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
    defaults: InitVar[ChatDefaults]
    plan: ChatPlan = field(init=False)
    model: str = ""

    def __post_init__(self, defaults: ChatDefaults) -> None:
        """The tools, tool_choice and conversation checked (400 before any token)."""
        self.plan = chat_plan(self.req, self.messages(), defaults)

    def messages(self) -> list[dict[str, Any]]:
        """The conversation for the chat template."""
        system = ([{"role": "system", "content": self.req.instructions}]
                  if self.req.instructions else [])
        return [*system, *self.history, *chat_messages(self.items)]

    def context(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What the next turn starts from: everything before, this input, this answer."""
        return [*self.history, *chat_messages(self.items), *chat_messages(output)]

    def body(self, status: str, output: list[dict[str, Any]] | None = None, *,
             usage: dict[str, Any] | None = None, error: LlmserveError | None = None,
             incomplete: str | None = None) -> dict[str, Any]:
        client = self.params.client
        req = self.req
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": req.background,
            "error": None if error is None else {"code": error.code or error.type,
                                                 "message": error.message},
            "incomplete_details": None if incomplete is None else {"reason": incomplete},
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model or req.model or "",
            "output": output or [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": self.stored,
            "temperature": client.get("temperature"),
            "text": {"format": req.text_format()},
            "tool_choice": "auto" if req.tool_choice is None else req.tool_choice,
            "tools": req.tools or [],
            "top_p": client.get("top_p"),
            "truncation": "disabled",
            "usage": usage,
            "user": req.user,
            "metadata": req.metadata or {},
        }

    def output(self, text: str, finish: Finish) -> ResponseOutput:
        """The output items of a whole answer (as a stream of it would build them)."""
        parsed = self.plan.output()
        output = ResponseOutput()
        output.add(parsed.feed(text))
        output.add(parsed.finish())
        self.plan.check(parsed.answer())
        output.finish(_status(finish))
        return output

    def finished(self, output: ResponseOutput, finish: Finish) -> dict[str, Any]:
        """The response object once the generation has ended with ``finish``."""
        status = _status(finish)
        return self.body(status, output.items(), usage=_usage(finish),
                         incomplete="max_output_tokens" if status == "incomplete" else None)


def _status(finish: Finish) -> Literal["completed", "incomplete"]:
    return "incomplete" if finish.reason == "length" else "completed"


def chat_plan(req: rp.ResponsesRequest, messages: list[dict[str, Any]],
              defaults: ChatDefaults) -> ChatPlan:
    """ChatPlan for a Responses request: its tools in chat's shape, and errors about them
    naming the fields as the Responses API spells them (``tools[0].name``, not
    ``tools[0].function.name``)."""
    try:
        return ChatPlan(messages, defaults, tools=req.chat_tools(),
                        tool_choice=req.chat_tool_choice(),
                        parallel_tool_calls=req.parallel_tool_calls)
    except InvalidRequest as exc:
        if exc.param is not None and ".function." in exc.param:
            exc.message = exc.message.replace(exc.param, exc.param.replace(".function.", "."))
            exc.param = exc.param.replace(".function.", ".")
        raise


def _usage(finish: Finish) -> dict[str, Any]:
    return {
        "input_tokens": finish.prompt_tokens,
        "input_tokens_details": {"cached_tokens": finish.cached_tokens},
        "output_tokens": finish.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def input_items(req: rp.ResponsesRequest, history: list[dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """This turn's input as stored items (each with an id), text only. A function call's
    output must answer a call made before it (in ``history`` or earlier in the input)."""
    raw = [rp.MessageItem(role="user", content=req.input)] if isinstance(req.input, str) \
        else req.input
    calls = {c["id"] for m in history for c in m.get("tool_calls") or []}
    items: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        if isinstance(item, rp.FunctionCallItem):
            calls.add(item.call_id)
            items.append({"id": item.id or object_id("fc"), "type": "function_call",
                          "status": "completed", "call_id": item.call_id, "name": item.name,
                          "arguments": item.arguments})
            continue
        if isinstance(item, rp.ReasoningItem):
            items.append({**item.model_dump(exclude_none=True), "id": item.id or object_id("rs")})
            continue
        try:
            text = item.text()
        except ValueError as exc:
            field_name = "content" if isinstance(item, rp.MessageItem) else "output"
            raise InvalidRequest(str(exc), param=f"input[{i}].{field_name}") from None
        if isinstance(item, rp.FunctionCallOutputItem):
            if item.call_id not in calls:
                raise InvalidRequest(
                    f"invalid 'input[{i}].call_id': {item.call_id!r} matches no function call "
                    "made before it (in this input or the previous response)",
                    param=f"input[{i}].call_id")
            items.append({"id": item.id or object_id("fco"), "type": "function_call_output",
                          "status": "completed", "call_id": item.call_id, "output": text})
            continue
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


def _save(state: AppState, turn: Turn, body: dict[str, Any]) -> None:
    if turn.stored and state.store is not None:
        state.store.put_response(body, turn.items, turn.context(body["output"]))


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
    turn = Turn(object_id("resp"), oa.now(), req, params, input_items(req, history), history,
                stored=req.store and state.store is not None, defaults=state.options.chat)
    if req.background:
        body = turn.body("queued")
        _save(state, turn, body)
        state.background[turn.id] = asyncio.ensure_future(_run_background(state, turn))
        return JSONResponse(body)
    gen = await start(state.host, turn.plan.build, params, limits=state.limits,
                      running=state.running, owner=Owner.of(request),
                      constrain=turn.plan.constrain)
    turn.model = gen.lease.engine.info.id
    if req.stream:
        return sse.EventStreamResponse(_events(state, turn, gen), on_close=gen.close)
    result = await collect_or_abandon(request, gen)
    if result is None:
        return Response(status_code=499)
    body = turn.finished(turn.output(result.text, result.finish), result.finish)
    _save(state, turn, body)
    return JSONResponse(body)


def _events(state: AppState, turn: Turn, gen: Generation) -> Any:
    """The typed event stream, in OpenAI's order, every event numbered."""
    numbers = itertools.count()
    parsed = turn.plan.output()
    output = ResponseOutput()

    def event(fields: Event) -> bytes:
        kind = fields["type"]
        return sse.event({"type": kind, "sequence_number": next(numbers), **fields}, name=kind)

    opening = [
        event({"type": "response.created", "response": turn.body("in_progress")}),
        event({"type": "response.in_progress", "response": turn.body("in_progress")}),
    ]

    def token(ev: TokenEvent) -> bytes | None:
        if not ev.text:
            return None
        return b"".join(event(e) for e in output.add(parsed.feed(ev.text))) or None

    def finish(fin: Finish) -> Iterable[bytes]:
        events = output.add(parsed.finish())
        turn.plan.check(parsed.answer())
        events += output.finish(_status(fin))
        body = turn.finished(output, fin)
        _save(state, turn, body)
        for e in events:
            yield event(e)
        yield event({"type": f"response.{body['status']}", "response": body})

    def error(exc: Exception) -> bytes:
        failure = exc if isinstance(exc, LlmserveError) else None
        if failure is None:
            error_payload(exc)  # logs it
            failure = LlmserveError("internal server error; the server log has the details")
        body = turn.body("failed", error=failure)
        _save(state, turn, body)
        return event({"type": "response.failed", "response": body})

    return relay(gen, token, finish, error, opening=opening)


async def _run_background(state: AppState, turn: Turn) -> None:
    """A background response: generated detached, written to the store as it moves."""
    try:
        gen = await start(state.host, turn.plan.build, turn.params, limits=state.limits,
                          running=state.running, constrain=turn.plan.constrain)
        try:
            turn.model = gen.lease.engine.info.id
            _save(state, turn, turn.body("in_progress"))
            result = await collect(gen.stream)
        finally:
            gen.close()
        body = turn.finished(turn.output(result.text, result.finish), result.finish)
    except asyncio.CancelledError:
        body = turn.body("cancelled")
    except LlmserveError as exc:
        body = turn.body("failed", error=exc)
    except Exception as exc:
        error_payload(exc)  # logs it
        body = turn.body("failed", error=LlmserveError("internal server error"))
    finally:
        state.background.pop(turn.id, None)
    _save(state, turn, body)


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
