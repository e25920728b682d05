"""POST /v1/chat/completions and POST /v1/completions."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmserve.engine.types import EngineProtocol, Finish, SamplingParams, TokenEvent
from llmserve.params import normalise
from llmserve.protocol import openai as oa
from llmserve.server import chat_plan, sse
from llmserve.server.chat_plan import ChatPlan
from llmserve.server.errors import error_payload
from llmserve.server.generation import (
    Collected,
    Generation,
    Owner,
    collect_or_abandon,
    messages_for_template,
    relay,
    start,
)
from llmserve.server.requests import parse
from llmserve.server.state import AppState

# Fields another family adds to the answer's last object (LM Studio's v0 routes): given the
# started generation (it may read the model file, off the event loop), a renderer of them from
# the Finish.
Extras = Callable[[Generation], Awaitable[Callable[[Finish], dict[str, Any]]]]


def usage(finish: Finish) -> oa.Usage:
    return oa.Usage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
        prompt_tokens_details=oa.PromptTokensDetails(cached_tokens=finish.cached_tokens),
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
    request: Request,
    req: oa.ChatCompletionRequest | oa.CompletionRequest,
    build: Callable[[EngineProtocol], list[int]],
    extras: Extras | None,
    constrain: Callable[[SamplingParams], SamplingParams] | None = None,
) -> tuple[Generation, Callable[[Finish], dict[str, Any]]]:
    """Admit and submit an OpenAI request (both endpoints share every generation option);
    returns it with the renderer of ``extras``' fields."""
    state = AppState.of(request)
    gen = await start(state.host, build, normalise(req.wire()), limits=state.limits,
                      running=state.running, owner=Owner.of(request), constrain=constrain)
    if extras is None:
        return gen, _no_extras
    try:
        return gen, await extras(gen)
    except BaseException:
        gen.close()
        raise


def _no_extras(_finish: Finish) -> dict[str, Any]:
    return {}


def _chunks(
    gen: Generation, head: dict[str, Any], include_usage: bool,
    choice: Callable[[str | None], dict[str, Any]], opening: dict[str, Any] | None,
    extra: Callable[[Finish], dict[str, Any]],
) -> AsyncGenerator[bytes, None]:
    """The SSE body of both endpoints: ``head`` (id, object, created, model) on every chunk;
    ``choice`` renders a piece of text (None: the final, empty one); ``opening``, a choice
    sent first; ``extra``'s fields go on the final choice's chunk."""

    def chunk(part: dict[str, Any], reason: str | None = None,
              timings: dict[str, int | float] | None = None,
              more: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {
            **head,
            "choices": [{"index": 0, **part, "logprobs": None, "finish_reason": reason}],
        }
        if include_usage:
            body["usage"] = None
        if timings is not None:  # on the last chunk, as llama-server does
            body["timings"] = timings
        return sse.event({**body, **(more or {})})

    def final(finish: Finish) -> list[bytes]:
        out = [chunk(choice(None), finish_reason(finish), finish.timings.to_dict(),
                     extra(finish))]
        if include_usage:
            out.append(sse.event({**head, "choices": [], "usage": oa.dump(usage(finish))}))
        return out

    return relay(
        gen, lambda ev: chunk(choice(ev.text)) if ev.text else None, final,
        lambda exc: sse.event(error_payload(exc)),
        opening=[chunk(opening)] if opening is not None else [], done=True,
    )


def _structured_chunks(
    gen: Generation, head: dict[str, Any], include_usage: bool, plan: ChatPlan,
    extra: Callable[[Finish], dict[str, Any]],
) -> AsyncGenerator[bytes, None]:
    """The SSE body of a chat answer that is parsed as it grows (tool calls, reasoning): each
    token may give several deltas, or none while a call marker may be arriving."""
    output = plan.output()

    def chunk(delta: dict[str, Any], reason: str | None = None,
              timings: dict[str, int | float] | None = None,
              more: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {**head, "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        if include_usage:
            body["usage"] = None
        if timings is not None:
            body["timings"] = timings
        return sse.event({**body, **(more or {})})

    def token(ev: TokenEvent) -> bytes | None:
        pieces = output.feed(ev.text) if ev.text else []
        return b"".join(chunk(chat_plan.delta(p)) for p in pieces) or None

    def final(finish: Finish) -> list[bytes]:
        out = [chunk(chat_plan.delta(p)) for p in output.finish()]
        answer = output.answer()
        plan.check(answer)
        out.append(chunk({}, chat_plan.finish_reason(finish, answer), finish.timings.to_dict(),
                         extra(finish)))
        if include_usage:
            out.append(sse.event({**head, "choices": [], "usage": oa.dump(usage(finish))}))
        return out

    return relay(gen, token, final, lambda exc: sse.event(error_payload(exc)),
                 opening=[chunk({"role": "assistant", "content": ""})], done=True)


def _structured_completion(
    result: Collected, plan: ChatPlan, head: dict[str, Any]
) -> dict[str, Any]:
    answer = chat_plan.collect(plan, plan.output(), result.text)
    return {
        **head, "object": "chat.completion",
        "choices": [{"index": 0, "message": chat_plan.message(answer), "logprobs": None,
                     "finish_reason": chat_plan.finish_reason(result.finish, answer)}],
        "usage": oa.dump(usage(result.finish)),
        "system_fingerprint": None,
        "timings": result.finish.timings.to_dict(),
    }


async def chat_completions(request: Request, extras: Extras | None = None) -> Response:
    req = await parse(request, oa.ChatCompletionRequest)
    plan = chat_plan_of(request, req)
    gen, extra = await _start(request, req, plan.build, extras, plan.constrain)
    model = gen.lease.engine.info.id
    cid, created = oa.new_id("chatcmpl"), oa.now()
    if plan.output().active:
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        if req.stream:
            return sse.EventStreamResponse(
                _structured_chunks(gen, head, _include_usage(req), plan, extra),
                on_close=gen.close)
        collected = await collect_or_abandon(request, gen)
        if collected is None:
            return Response(status_code=499)
        return JSONResponse({**_structured_completion(collected, plan, head),
                             **extra(collected.finish)})
    if req.stream:
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        chunks = _chunks(
            gen, head, _include_usage(req),
            lambda text: {"delta": {} if text is None else {"content": text}},
            # the role in the first delta, as the openai SDK expects
            opening={"delta": {"role": "assistant", "content": ""}}, extra=extra,
        )
        return sse.EventStreamResponse(chunks, on_close=gen.close)
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
    return JSONResponse({**oa.dump(body), **extra(result.finish)})


def _include_usage(req: oa.ChatCompletionRequest | oa.CompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


async def completions(request: Request, extras: Extras | None = None) -> Response:
    req = await parse(request, oa.CompletionRequest)
    text = req.prompt_text

    def build(engine: EngineProtocol) -> list[int]:
        return engine.tokenize(text, add_special=True)

    gen, extra = await _start(request, req, build, extras)
    model = gen.lease.engine.info.id
    cid, created = oa.new_id("cmpl"), oa.now()
    prefix = text if req.echo else ""
    if req.stream:
        head = {"id": cid, "object": "text_completion", "created": created, "model": model}
        chunks = _chunks(gen, head, _include_usage(req), lambda t: {"text": t or ""},
                         opening={"text": prefix} if prefix else None, extra=extra)
        return sse.EventStreamResponse(chunks, on_close=gen.close)
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
    return JSONResponse({**oa.dump(body), **extra(result.finish)})


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
