"""KoboldCpp's API as SillyTavern's KoboldCpp and KoboldAI types use it: POST /api/v1/generate,
/api/extra/generate/stream, /api/extra/tokencount, /api/extra/abort; GET /api/v1/model,
/api/extra/version and the config reads. (SillyTavern's KoboldCpp type generates through
/v1/completions, see routes/openai.py.)

Abort: with a ``genkey`` it cancels the generations started with that key (from any address);
without one — SillyTavern's Stop button posts no body — it cancels the generations the same
client address started without a key, on every route (/v1/completions included). KoboldCpp,
single-user, aborts "the" current generation; this is that, per caller.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmserve import __version__
from llmserve.engine.types import EngineProtocol, Finish, TokenEvent
from llmserve.params import normalise
from llmserve.protocol import kobold as kb
from llmserve.server import sse
from llmserve.server.errors import error_payload
from llmserve.server.generation import (
    Generation,
    Owner,
    borrowed,
    collect_or_abandon,
    relay,
    start,
)
from llmserve.server.requests import parse, read_json_object, validate
from llmserve.server.state import AppState

# The KoboldCpp release whose API this follows; SillyTavern gates sampler fields on it.
KOBOLDCPP_VERSION = "1.102"
# KoboldAI United's API version, reported at /api/v1/info/version.
KOBOLDAI_API_VERSION = "1.2.5"

async def _begin(request: Request) -> tuple[kb.GenerateRequest, Generation]:
    state = AppState.of(request)
    req = await parse(request, kb.GenerateRequest)
    text = req.memory + req.prompt

    def build(engine: EngineProtocol) -> list[int]:
        return engine.tokenize(text, add_special=True)

    gen = await start(state.host, build, normalise(req.wire()),
                      limits=state.limits, running=state.running,
                      owner=Owner.of(request, req.genkey))
    return req, gen


def _finish_reason(finish: Finish) -> str:
    return "length" if finish.reason == "length" else "stop"


def _kept_stop(req: kb.GenerateRequest, finish: Finish) -> str:
    """KoboldCpp's trim_stop: false leaves the stop sequence at the end of the text."""
    return finish.stop_word if not req.trim_stop and finish.stop_word else ""


async def generate(request: Request) -> Response:
    req, gen = await _begin(request)
    result = await collect_or_abandon(request, gen)
    if result is None:
        return Response(status_code=499)
    finish = result.finish
    return JSONResponse({"results": [{
        "text": result.text + _kept_stop(req, finish),
        "finish_reason": _finish_reason(finish),
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
    }]})


async def generate_stream(request: Request) -> sse.EventStreamResponse:
    """KoboldCpp's SSE: ``event: message`` / ``data: {"token", "finish_reason"}`` per piece of
    text; the last event has the finish_reason."""
    req, gen = await _begin(request)
    return sse.EventStreamResponse(_token_events(req, gen), on_close=gen.close)


def _token_events(req: kb.GenerateRequest, gen: Generation) -> AsyncGenerator[bytes, None]:
    def token(ev: TokenEvent) -> bytes | None:
        return sse.event({"token": ev.text, "finish_reason": None}, name="message") if (
            ev.text) else None

    def final(finish: Finish) -> list[bytes]:
        return [sse.event({"token": _kept_stop(req, finish),
                           "finish_reason": _finish_reason(finish)}, name="message")]

    return relay(gen, token, final, lambda exc: sse.event(error_payload(exc), name="error"))


async def tokencount(request: Request) -> JSONResponse:
    req = await parse(request, kb.TokenCountRequest)
    ids = await borrowed(AppState.of(request).host,
                         lambda e: e.tokenize(req.prompt, add_special=True), req.model)
    return JSONResponse({"value": len(ids), "ids": ids})


async def abort(request: Request) -> JSONResponse:
    state = AppState.of(request)
    body = await request.body()
    req = validate(kb.AbortRequest, await read_json_object(request)) if body.strip() else (
        kb.AbortRequest()
    )
    n = state.running.abort(client=Owner.of(request).client, genkey=req.genkey)
    flag = "true" if n else "false"
    return JSONResponse({"success": flag, "done": flag})


async def model(request: Request) -> JSONResponse:
    info = AppState.of(request).host.current().info
    return JSONResponse({"result": f"koboldcpp/{info.id}"})


async def version(_request: Request) -> JSONResponse:
    return JSONResponse({
        "result": "KoboldCpp", "version": KOBOLDCPP_VERSION, "protected": False,
        "txt2img": False, "vision": False, "audio": False, "transcribe": False,
        "multiplayer": False, "websearch": False, "tts": False, "embeddings": False,
        "savedata": False, "server": "llmserve", "server_version": __version__,
    })


async def api_version(_request: Request) -> JSONResponse:
    return JSONResponse({"result": KOBOLDAI_API_VERSION})


async def max_context_length(request: Request) -> JSONResponse:
    return JSONResponse({"value": AppState.of(request).host.current().info.n_ctx})


async def max_length(request: Request) -> JSONResponse:
    state = AppState.of(request)
    n_ctx = state.host.current().info.n_ctx
    return JSONResponse({"value": state.limits.max_tokens_limit or n_ctx})


routes = [
    Route("/api/v1/generate", generate, methods=["POST"]),
    Route("/api/extra/generate/stream", generate_stream, methods=["POST"]),
    Route("/api/extra/tokencount", tokencount, methods=["POST"]),
    Route("/api/extra/abort", abort, methods=["POST"]),
    Route("/api/v1/model", model, methods=["GET"]),
    Route("/api/extra/version", version, methods=["GET"]),
    Route("/api/v1/info/version", api_version, methods=["GET"]),
    Route("/api/v1/config/max_context_length", max_context_length, methods=["GET"]),
    Route("/api/extra/true_max_context_length", max_context_length, methods=["GET"]),
    Route("/api/v1/config/max_length", max_length, methods=["GET"]),
]
