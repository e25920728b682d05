"""POST /v1/chat/completions and POST /v1/completions."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmserve.engine.types import EngineProtocol, Finish, SamplingParams, TokenEvent
from llmserve.params import Params, normalise
from llmserve.protocol import openai as oa
from llmserve.server import chat_plan, sse
from llmserve.server.chat_plan import ChatPlan
from llmserve.server.errors import error_payload
from llmserve.server.generation import (
    Collected,
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

# Fields another family adds to the answer's last object (LM Studio's v0 routes): given the
# started generation (it may read the model file, off the event loop), a renderer of them from
# the Finish.
Extras = Callable[[Generation], Awaitable[Callable[[Finish], dict[str, Any]]]]
Extra = Callable[[Finish], dict[str, Any]]


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


def chat_plan_of(request: Request, req: oa.ChatCompletionRequest) -> ChatPlan:
    """The request's tools, template options and reasoning split, checked (400 before any
    token)."""
    return ChatPlan(
        messages_for_template(req.messages), AppState.of(request).options.chat,
        tools=req.tools, tool_choice=req.tool_choice,
        parallel_tool_calls=req.parallel_tool_calls,
        chat_template_kwargs=req.chat_template_kwargs, reasoning=req.reasoning_format,
    )


async def _start(
    request: Request, params: Params, build: Callable[[EngineProtocol], list[int]],
    extras: Extras | None,
    constrain: Callable[[SamplingParams], SamplingParams] | None = None,
) -> tuple[Generation, Extra]:
    """Admit and submit an OpenAI request (both endpoints share every generation option);
    returns it with the renderer of ``extras``' fields."""
    state = AppState.of(request)
    gen = await start(state.host, build, params, limits=state.limits, running=state.running,
                      owner=Owner.of(request), constrain=constrain)
    if extras is None:
        return gen, _no_extras
    try:
        return gen, await extras(gen)
    except BaseException:
        gen.close()
        raise


def _no_extras(_finish: Finish) -> dict[str, Any]:
    return {}


def _chunk_maker(
    head: dict[str, Any], include_usage: bool,
) -> Callable[..., bytes]:
    """One SSE chunk of one choice: ``head`` (id, object, created, model), the choice's
    ``part`` (a delta, or text), its log-probabilities, finish reason; ``timings`` and the
    ``extra`` fields on a choice's last chunk, as llama-server and LM Studio put them."""

    def chunk(index: int, part: dict[str, Any], reason: str | None = None,
              timings: dict[str, int | float] | None = None,
              more: dict[str, Any] | None = None, probs: BaseModel | None = None) -> bytes:
        body: dict[str, Any] = {
            **head,
            "choices": [{"index": index, **part,
                         "logprobs": None if probs is None else oa.dump(probs),
                         "finish_reason": reason}],
        }
        if include_usage:
            body["usage"] = None
        if timings is not None:
            body["timings"] = timings
        return sse.event({**body, **(more or {})})

    return chunk


def _chunks(
    gen: Generation, head: dict[str, Any], include_usage: bool,
    choice: Callable[[str | None], dict[str, Any]], opening: dict[str, Any] | None,
    extra: Extra, logprobs: Callable[[TokenEvent], BaseModel] | None = None,
) -> AsyncGenerator[bytes, None]:
    """The SSE body of both endpoints' plain answers: ``choice`` renders a piece of text (None:
    the final, empty one); ``opening``, a choice sent first; ``logprobs`` renders a token's
    log-probabilities (asked for: every token gets a chunk, even one whose text is held back);
    ``extra``'s fields go on each choice's final chunk. Each choice (``n``) streams under its
    ``index``; the usage chunk comes after the last one finishes."""
    finishes: list[Finish] = []
    n = len(gen.streams)
    chunk = _chunk_maker(head, include_usage)

    def token(ev: TokenEvent) -> bytes | None:
        if logprobs is not None and ev.logprob is not None:
            return chunk(ev.choice, choice(ev.text), probs=logprobs(ev))
        return chunk(ev.choice, choice(ev.text)) if ev.text else None

    def final(finish: Finish) -> list[bytes]:
        finishes.append(finish)
        out = [chunk(finish.choice, choice(None), finish_reason(finish),
                     finish.timings.to_dict(), extra(finish))]
        if include_usage and len(finishes) == n:
            out.append(sse.event({**head, "choices": [], "usage": oa.dump(usage(finishes))}))
        return out

    return relay(
        gen, token, final, lambda exc: sse.event(error_payload(exc)),
        opening=[chunk(i, opening) for i in range(n)] if opening is not None else [],
        done=True,
    )


def _structured_chunks(
    gen: Generation, head: dict[str, Any], include_usage: bool, plan: ChatPlan,
    extra: Extra, logprobs: Callable[[TokenEvent], BaseModel] | None = None,
) -> AsyncGenerator[bytes, None]:
    """The SSE body of a chat answer that is parsed as it grows (tool calls, reasoning), one
    parse per choice: each token may give several deltas, or none while a call marker may be
    arriving (with logprobs asked for, that token still gets a chunk, with an empty delta)."""
    outputs = [plan.output() for _ in gen.streams]
    finishes: list[Finish] = []
    n = len(gen.streams)
    chunk = _chunk_maker(head, include_usage)

    def token(ev: TokenEvent) -> bytes | None:
        pieces = outputs[ev.choice].feed(ev.text) if ev.text else []
        probs = logprobs(ev) if logprobs is not None and ev.logprob is not None else None
        if probs is not None and not pieces:
            return chunk(ev.choice, {"delta": {}}, probs=probs)
        return b"".join(chunk(ev.choice, {"delta": chat_plan.delta(p)},
                              probs=probs if k == 0 else None)
                        for k, p in enumerate(pieces)) or None

    def final(finish: Finish) -> list[bytes]:
        finishes.append(finish)
        output = outputs[finish.choice]
        out = [chunk(finish.choice, {"delta": chat_plan.delta(p)}) for p in output.finish()]
        answer = output.answer()
        plan.check(answer)
        out.append(chunk(finish.choice, {"delta": {}}, chat_plan.finish_reason(finish, answer),
                         finish.timings.to_dict(), extra(finish)))
        if include_usage and len(finishes) == n:
            out.append(sse.event({**head, "choices": [], "usage": oa.dump(usage(finishes))}))
        return out

    return relay(gen, token, final, lambda exc: sse.event(error_payload(exc)),
                 opening=[chunk(i, {"delta": {"role": "assistant", "content": ""}})
                          for i in range(n)], done=True)


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


async def chat_completions(request: Request, extras: Extras | None = None) -> Response:
    req = await parse(request, oa.ChatCompletionRequest)
    plan = chat_plan_of(request, req)
    params = normalise(req.wire())
    gen, extra = await _start(request, params, plan.build, extras, plan.constrain)
    model = gen.lease.engine.info.id
    cid, created = oa.new_id("chatcmpl"), oa.now()
    probs = _logprob_renderers(gen, params.logprobs, ChatLogprobs)
    structured = plan.output().active
    if req.stream:
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        if structured:
            chunks = _structured_chunks(gen, head, _include_usage(req), plan, extra,
                                        _streamed_logprobs(probs))
        else:
            chunks = _chunks(
                gen, head, _include_usage(req),
                lambda text: {"delta": {} if text is None else {"content": text}},
                # the role in the first delta, as the openai SDK expects
                opening={"delta": {"role": "assistant", "content": ""}}, extra=extra,
                logprobs=_streamed_logprobs(probs),
            )
        return sse.EventStreamResponse(chunks, on_close=gen.close)
    results = await collect_choices_or_abandon(request, gen)
    if results is None:
        return Response(status_code=499)

    def choice(i: int, result: Collected) -> dict[str, Any]:
        logprobs = None if probs is None else oa.dump(probs[i].render(result.probs))
        if structured:
            answer = chat_plan.collect(plan, plan.output(), result.text)
            return {"index": i, "message": chat_plan.message(answer), "logprobs": logprobs,
                    "finish_reason": chat_plan.finish_reason(result.finish, answer)}
        return {"index": i, "message": oa.dump(oa.AssistantMessage(content=result.text)),
                "logprobs": logprobs, "finish_reason": finish_reason(result.finish)}

    body = {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [choice(i, r) for i, r in enumerate(results)],
        "usage": oa.dump(usage([r.finish for r in results])),
        "system_fingerprint": None,
        "timings": results[0].finish.timings.to_dict(),
    }
    return JSONResponse({**body, **extra(results[0].finish)})


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


async def completions(request: Request, extras: Extras | None = None) -> Response:
    req = await parse(request, oa.CompletionRequest)
    params = normalise(req.wire())
    gen, extra = await _start(request, params, completion_prompt_builder(req), extras)
    model = gen.lease.engine.info.id
    cid, created = oa.new_id("cmpl"), oa.now()
    prefix = req.prompt_text if req.echo else ""
    probs = _logprob_renderers(
        gen, params.logprobs,
        lambda engine, top: CompletionLogprobs(engine, top, offset=len(prefix)))
    if req.stream:
        head = {"id": cid, "object": "text_completion", "created": created, "model": model}
        chunks = _chunks(gen, head, _include_usage(req), lambda t: {"text": t or ""},
                         opening={"text": prefix} if prefix else None, extra=extra,
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
    return JSONResponse({**oa.dump(body), **extra(results[0].finish)})


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
