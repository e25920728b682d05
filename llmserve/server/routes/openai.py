"""POST /v1/chat/completions and POST /v1/completions."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmserve.engine.types import EngineProtocol, Finish, SamplingParams, TokenEvent
from llmserve.errors import InvalidRequest
from llmserve.protocol import openai as oa
from llmserve.registry import KEEP
from llmserve.server import sse
from llmserve.server.errors import error_payload
from llmserve.server.generation import (
    Generation,
    Owner,
    check_finish,
    collect_or_abandon,
    logit_bias_pairs,
    messages_for_template,
    start,
)
from llmserve.server.requests import parse
from llmserve.server.state import AppState

# SamplingParams fields that need more than copying the request's value across.
_CONVERTED = {"logit_bias", "samplers", "dry_sequence_breakers", "grammar", "json_schema"}


def sampling_from(req: oa._Sampling) -> SamplingParams:
    fields: dict[str, Any] = {
        f.name: getattr(req, f.name)
        for f in dataclasses.fields(SamplingParams)
        if f.name not in _CONVERTED and getattr(req, f.name, None) is not None
    }
    if req.samplers:  # a list of names, or llama.cpp's string of one-letter names
        fields["samplers"] = tuple(req.samplers)
    if req.dry_sequence_breakers is not None:
        fields["dry_sequence_breakers"] = tuple(req.dry_sequence_breakers)
    schema = req.json_schema
    if req.response_format is not None and req.response_format.type != "text":
        schema = req.response_format.schema_or_none()  # llama-server: response_format wins
    if req.grammar and schema is not None:
        raise InvalidRequest(
            "invalid 'grammar': give either a grammar or a JSON schema (json_schema or "
            "response_format), not both", param="grammar",
        )
    return dataclasses.replace(
        SamplingParams(), **fields, logit_bias=logit_bias_pairs(req.logit_bias),
        grammar=req.grammar or None, json_schema=schema,
    )


def sampling_param_names(req: oa._Sampling) -> dict[str, str]:
    """Engine-side sampling errors named as this request sent them."""
    if req.response_format is not None and req.response_format.type != "text":
        return {"json_schema": "response_format"}
    return {}


def usage(finish: Finish) -> oa.Usage:
    return oa.Usage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
        prompt_tokens_details=oa.PromptTokensDetails(cached_tokens=finish.cached_tokens),
    )


def finish_reason(finish: Finish) -> str:
    return "length" if finish.reason == "length" else "stop"


def chat_prompt_builder(req: oa.ChatCompletionRequest) -> Callable[[EngineProtocol], list[int]]:
    messages = messages_for_template(req.messages)

    def build(engine: EngineProtocol) -> list[int]:
        return engine.tokenize(engine.format_chat(messages), add_special=True)

    return build


async def _start(
    request: Request,
    req: oa.ChatCompletionRequest | oa.CompletionRequest,
    build: Callable[[EngineProtocol], list[int]],
) -> Generation:
    """Admit and submit an OpenAI request (both endpoints share every generation option)."""
    state = AppState.of(request)
    return await start(
        state.host,
        build,
        requested_max_tokens=req.requested_max_tokens,
        sampling=sampling_from(req),
        stop=req.stop_list(),
        limits=state.limits,
        model=req.model,
        keep_alive=req.keep_alive_seconds(KEEP),
        explicit_sampling=req.explicit_fields(),
        running=state.running,
        owner=Owner.of(request),
        param_names=sampling_param_names(req),
    )


async def chat_completions(request: Request) -> Response:
    req = await parse(request, oa.ChatCompletionRequest)
    build = chat_prompt_builder(req)
    gen = await _start(request, req, build)
    model = gen.lease.engine.info.id
    cid, created = oa.new_id("chatcmpl"), oa.now()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse.EventStreamResponse(_chat_chunks(gen, cid, created, model, include_usage),
                                       on_close=gen.close)
    result = await collect_or_abandon(request, gen)
    if result is None:
        return Response(status_code=499)
    body = oa.ChatCompletion(
        id=cid,
        created=created,
        model=model,
        choices=[
            oa.ChatChoice(
                message=oa.AssistantMessage(content=result.text),
                finish_reason=finish_reason(result.finish),
            )
        ],
        usage=usage(result.finish),
        timings=result.finish.timings.to_dict(),
    )
    return JSONResponse(oa.dump(body))


async def _chat_chunks(
    gen: Generation, cid: str, created: int, model: str, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    def chunk(delta: dict[str, str], reason: str | None = None,
              timings: dict[str, int | float] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
        }
        if include_usage:
            body["usage"] = None
        if timings is not None:  # on the last chunk, as llama-server does
            body["timings"] = timings
        return sse.event(body)

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in gen.events():
            if isinstance(ev, TokenEvent):
                if ev.text:
                    yield chunk({"content": ev.text})
                continue
            finish = check_finish(ev)
            yield chunk({}, finish_reason(finish), finish.timings.to_dict())
            if include_usage:
                yield sse.event({
                    "id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [], "usage": oa.dump(usage(finish)),
                })
    except Exception as exc:  # mid-stream failure: an error event, then [DONE]
        yield sse.event(error_payload(exc))
    finally:
        gen.close()
    yield sse.DONE


async def completions(request: Request) -> Response:
    req = await parse(request, oa.CompletionRequest)
    text = req.prompt_text

    def build(engine: EngineProtocol) -> list[int]:
        return engine.tokenize(text, add_special=True)

    gen = await _start(request, req, build)
    model = gen.lease.engine.info.id
    cid, created = oa.new_id("cmpl"), oa.now()
    prefix = text if req.echo else ""
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse.EventStreamResponse(
            _completion_chunks(gen, cid, created, model, include_usage, prefix),
            on_close=gen.close,
        )
    result = await collect_or_abandon(request, gen)
    if result is None:
        return Response(status_code=499)
    body = oa.Completion(
        id=cid,
        created=created,
        model=model,
        choices=[oa.CompletionChoice(text=prefix + result.text,
                                     finish_reason=finish_reason(result.finish))],
        usage=usage(result.finish),
        timings=result.finish.timings.to_dict(),
    )
    return JSONResponse(oa.dump(body))


async def _completion_chunks(
    gen: Generation, cid: str, created: int, model: str, include_usage: bool, prefix: str
) -> AsyncGenerator[bytes, None]:
    def chunk(text: str, reason: str | None = None,
              timings: dict[str, int | float] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
        }
        if include_usage:
            body["usage"] = None
        if timings is not None:  # on the last chunk, as llama-server does
            body["timings"] = timings
        return sse.event(body)

    try:
        if prefix:
            yield chunk(prefix)
        async for ev in gen.events():
            if isinstance(ev, TokenEvent):
                if ev.text:
                    yield chunk(ev.text)
                continue
            finish = check_finish(ev)
            yield chunk("", finish_reason(finish), finish.timings.to_dict())
            if include_usage:
                yield sse.event({
                    "id": cid, "object": "text_completion", "created": created,
                    "model": model, "choices": [], "usage": oa.dump(usage(finish)),
                })
    except Exception as exc:
        yield sse.event(error_payload(exc))
    finally:
        gen.close()
    yield sse.DONE


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
