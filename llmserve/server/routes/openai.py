"""POST /v1/chat/completions and POST /v1/completions."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmserve.engine.types import EngineProtocol, Finish, TokenEvent
from llmserve.params import Params, normalise
from llmserve.protocol import openai as oa
from llmserve.server import sse
from llmserve.server.errors import error_payload
from llmserve.server.generation import (
    Generation,
    Owner,
    collect_choices_or_abandon,
    fim_prompt_builder,
    messages_for_template,
    relay,
    start,
)
from llmserve.server.logprobs import ChatLogprobs, CompletionLogprobs
from llmserve.server.requests import parse
from llmserve.server.state import AppState

R = TypeVar("R", ChatLogprobs, CompletionLogprobs)


def usage(finishes: Sequence[Finish]) -> oa.Usage:
    """The prompt once (the choices share it) and every choice's generated tokens."""
    first = finishes[0]
    completion = sum(f.completion_tokens for f in finishes)
    return oa.Usage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=completion,
        total_tokens=first.prompt_tokens + completion,
        prompt_tokens_details=oa.PromptTokensDetails(cached_tokens=first.cached_tokens),
    )


def finish_reason(finish: Finish) -> str:
    return "length" if finish.reason == "length" else "stop"


def chat_prompt_builder(req: oa.ChatCompletionRequest) -> Callable[[EngineProtocol], list[int]]:
    messages = messages_for_template(req.messages)

    def build(engine: EngineProtocol) -> list[int]:
        return engine.tokenize(engine.format_chat(messages), add_special=True)

    return build


async def _start(
    request: Request, params: Params, build: Callable[[EngineProtocol], list[int]],
) -> Generation:
    """Admit and submit an OpenAI request (both endpoints share every generation option)."""
    state = AppState.of(request)
    return await start(state.host, build, params, limits=state.limits,
                       running=state.running, owner=Owner.of(request))


def _chunks(
    gen: Generation, head: dict[str, Any], include_usage: bool,
    choice: Callable[[str | None], dict[str, Any]], opening: dict[str, Any] | None,
    logprobs: Callable[[TokenEvent], BaseModel] | None = None,
) -> AsyncGenerator[bytes, None]:
    """The SSE body of both endpoints: ``head`` (id, object, created, model) on every chunk;
    ``choice`` renders a piece of text (None: the final, empty one); ``opening``, a choice
    sent first; ``logprobs`` renders a token's log-probabilities (asked for: every token gets
    a chunk, even one whose text is held back). Each choice (``n``) streams under its
    ``index``; the usage chunk comes after the last one finishes."""
    finishes: list[Finish] = []
    n = len(gen.streams)

    def chunk(index: int, part: dict[str, Any], reason: str | None = None,
              timings: dict[str, int | float] | None = None,
              probs: BaseModel | None = None) -> bytes:
        body: dict[str, Any] = {
            **head,
            "choices": [{"index": index, **part,
                         "logprobs": None if probs is None else oa.dump(probs),
                         "finish_reason": reason}],
        }
        if include_usage:
            body["usage"] = None
        if timings is not None:  # on the last chunk, as llama-server does
            body["timings"] = timings
        return sse.event(body)

    def token(ev: TokenEvent) -> bytes | None:
        if logprobs is not None and ev.logprob is not None:
            return chunk(ev.choice, choice(ev.text), probs=logprobs(ev))
        return chunk(ev.choice, choice(ev.text)) if ev.text else None

    def final(finish: Finish) -> list[bytes]:
        finishes.append(finish)
        out = [chunk(finish.choice, choice(None), finish_reason(finish),
                     finish.timings.to_dict())]
        if include_usage and len(finishes) == n:
            out.append(sse.event({**head, "choices": [], "usage": oa.dump(usage(finishes))}))
        return out

    return relay(
        gen, token, final, lambda exc: sse.event(error_payload(exc)),
        opening=[chunk(i, opening) for i in range(n)] if opening is not None else [],
        done=True,
    )


def _logprob_renderers(
    gen: Generation, top: int | None, make: Callable[[EngineProtocol, int], R],
) -> list[R] | None:
    """One logprobs renderer per choice, or None when the request did not ask for them."""
    if top is None:
        return None
    return [make(gen.lease.engine, top) for _ in gen.streams]


def _streamed_logprobs(renderers: list[R] | None
                       ) -> Callable[[TokenEvent], BaseModel] | None:
    if renderers is None:
        return None
    return lambda ev: renderers[ev.choice].render([ev])


async def chat_completions(request: Request) -> Response:
    req = await parse(request, oa.ChatCompletionRequest)
    build = chat_prompt_builder(req)
    params = normalise(req.wire())
    gen = await _start(request, params, build)
    model = gen.lease.engine.info.id
    cid, created = oa.new_id("chatcmpl"), oa.now()
    probs = _logprob_renderers(gen, params.logprobs, ChatLogprobs)
    if req.stream:
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        chunks = _chunks(
            gen, head, _include_usage(req),
            lambda text: {"delta": {} if text is None else {"content": text}},
            # the role in the first delta, as the openai SDK expects
            opening={"delta": {"role": "assistant", "content": ""}},
            logprobs=_streamed_logprobs(probs),
        )
        return sse.EventStreamResponse(chunks, on_close=gen.close)
    results = await collect_choices_or_abandon(request, gen)
    if results is None:
        return Response(status_code=499)
    body = oa.ChatCompletion(
        id=cid,
        created=created,
        model=model,
        choices=[
            oa.ChatChoice(
                index=i,
                message=oa.AssistantMessage(content=result.text),
                finish_reason=finish_reason(result.finish),
                logprobs=None if probs is None else probs[i].render(result.probs),
            )
            for i, result in enumerate(results)
        ],
        usage=usage([r.finish for r in results]),
        timings=results[0].finish.timings.to_dict(),
    )
    return JSONResponse(oa.dump(body))


def _include_usage(req: oa.ChatCompletionRequest | oa.CompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def completion_prompt_builder(req: oa.CompletionRequest) -> Callable[[EngineProtocol], list[int]]:
    """The prompt as text; with a ``suffix``, a fill-in-the-middle prompt (the prompt is what
    comes before the completion)."""
    text = req.prompt_text
    if req.suffix:
        return fim_prompt_builder(text, req.suffix, param="suffix")

    def build(engine: EngineProtocol) -> list[int]:
        return engine.tokenize(text, add_special=True)

    return build


async def completions(request: Request) -> Response:
    req = await parse(request, oa.CompletionRequest)
    params = normalise(req.wire())
    gen = await _start(request, params, completion_prompt_builder(req))
    model = gen.lease.engine.info.id
    cid, created = oa.new_id("cmpl"), oa.now()
    prefix = req.prompt_text if req.echo else ""
    probs = _logprob_renderers(
        gen, params.logprobs,
        lambda engine, top: CompletionLogprobs(engine, top, offset=len(prefix)))
    if req.stream:
        head = {"id": cid, "object": "text_completion", "created": created, "model": model}
        chunks = _chunks(gen, head, _include_usage(req), lambda t: {"text": t or ""},
                         opening={"text": prefix} if prefix else None,
                         logprobs=_streamed_logprobs(probs))
        return sse.EventStreamResponse(chunks, on_close=gen.close)
    results = await collect_choices_or_abandon(request, gen)
    if results is None:
        return Response(status_code=499)
    body = oa.Completion(
        id=cid,
        created=created,
        model=model,
        choices=[
            oa.CompletionChoice(
                index=i, text=prefix + result.text, finish_reason=finish_reason(result.finish),
                logprobs=None if probs is None else probs[i].render(result.probs),
            )
            for i, result in enumerate(results)
        ],
        usage=usage([r.finish for r in results]),
        timings=results[0].finish.timings.to_dict(),
    )
    return JSONResponse(oa.dump(body))


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
