"""The seed API's native routes: POST /generate, /chat and /generate/batch.

Their errors render as ``{"detail": "..."}`` (see server/errors.py): 400 bad input, 404 unknown
model_id, 413 a prompt longer than the context, 429, 500, 503. Streaming is SSE with one
``data: <token text>`` event per piece of text, ending ``data: [DONE]``; a failure mid-stream is
an ``event: error`` whose data is ``{"detail": ...}``, then ``data: [DONE]``.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmserve.engine.types import EngineProtocol, Finish
from llmserve.errors import InvalidRequest
from llmserve.params import Params, normalise
from llmserve.protocol import native as nv
from llmserve.server import sse
from llmserve.server.errors import detail_errors, error_payload
from llmserve.server.generation import (
    Collected,
    Generation,
    Owner,
    collect,
    collect_or_abandon,
    messages_for_template,
    relay,
    run_all,
    start,
)
from llmserve.server.requests import parse
from llmserve.server.state import AppState

Build = Callable[[EngineProtocol], list[int]]


def usage(*finishes: Finish) -> dict[str, int]:
    prompt = sum(f.prompt_tokens for f in finishes)
    completion = sum(f.completion_tokens for f in finishes)
    return nv.Usage(prompt_tokens=prompt, completion_tokens=completion,
                    total_tokens=prompt + completion).model_dump()


def text_builder(text: str) -> Build:
    def build(engine: EngineProtocol) -> list[int]:
        return engine.tokenize(text, add_special=True)

    return build


async def _begin(request: Request, params: Params, build: Build) -> Generation:
    state = AppState.of(request)
    return await start(state.host, build, params, limits=state.limits, running=state.running,
                       owner=Owner.of(request))


async def _run(
    request: Request, req: nv._Options, build: Build
) -> Response | sse.EventStreamResponse | Collected:
    gen = await _begin(request, normalise(req.wire()), build)
    if req.stream:
        return sse.EventStreamResponse(_text_events(gen), on_close=gen.close)
    result = await collect_or_abandon(request, gen)
    return Response(status_code=499) if result is None else result


def _text_events(gen: Generation) -> AsyncGenerator[bytes, None]:
    return relay(gen, lambda ev: sse.text_event(ev.text) if ev.text else None, lambda _: (),
                 lambda exc: sse.event(error_payload(exc, "detail"), name="error"), done=True)


@detail_errors
async def generate(request: Request) -> Response | sse.EventStreamResponse:
    req = await parse(request, nv.GenerateRequest)
    result = await _run(request, req, text_builder(req.prompt))
    if not isinstance(result, Collected):
        return result
    return JSONResponse({"response": result.text, "usage": usage(result.finish)})


@detail_errors
async def chat(request: Request) -> Response | sse.EventStreamResponse:
    req = await parse(request, nv.ChatRequest)
    messages = messages_for_template(req.messages)

    def build(engine: EngineProtocol) -> list[int]:
        return engine.tokenize(engine.format_chat(messages), add_special=True)

    result = await _run(request, req, build)
    if not isinstance(result, Collected):
        return result
    finish_reason = "length" if result.finish.reason == "length" else "stop"
    return JSONResponse({
        "choices": [{"message": {"role": "assistant", "content": result.text},
                     "finish_reason": finish_reason}],
        "usage": usage(result.finish),
    })


@detail_errors
async def generate_batch(request: Request) -> Response:
    """Every prompt through the slots at once (at most one per slot at a time from this
    batch, so a batch never fills the queue by itself); responses in input order."""
    req = await parse(request, nv.BatchRequest)
    if req.stream:
        raise InvalidRequest("/generate/batch does not stream; send stream: false",
                             param="stream")

    params = normalise(req.wire())

    async def one(prompt: str, started: Generation | None = None) -> Collected:
        gen = started or await _begin(request, params, text_builder(prompt))
        try:
            return await collect(gen.stream)
        finally:
            gen.close()

    # the first prompt loads the model if needed, and tells how many slots it has
    first = await _begin(request, params, text_builder(req.prompts[0]))
    slots = first.lease.engine.info.n_parallel
    works = [functools.partial(one, req.prompts[0], first),
             *(functools.partial(one, p) for p in req.prompts[1:])]
    try:
        results = await sse.until_disconnect(request.receive,
                                             lambda: run_all(works, limit=slots))
    finally:
        first.close()  # idempotent; covers a batch cancelled before its first work ran
    if results is None:
        return Response(status_code=499)
    return JSONResponse({"responses": [r.text for r in results],
                         "usage": usage(*(r.finish for r in results))})


routes = [
    Route("/generate", generate, methods=["POST"]),
    Route("/generate/batch", generate_batch, methods=["POST"]),
    Route("/chat", chat, methods=["POST"]),
]
