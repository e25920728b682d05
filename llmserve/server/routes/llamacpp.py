"""llama.cpp's native API, as llama-server serves it and SillyTavern's "llama.cpp" type uses it:
POST /completion, /tokenize, /detokenize, /apply-template; GET /props, /slots.

Errors use the OpenAI envelope like every other route. Differences from llama-server, on purpose:
a prompt that does not fit is refused (400 context_length_exceeded) rather than truncated; a
request for more tokens than fit is capped to the room left (as llama-server does); ``n`` > 1
(swipes) needs ``stream: false``; logit_bias takes token ids, not strings.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import math
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmserve import __version__
from llmserve.engine.fim import ExtraFile
from llmserve.engine.types import (
    EngineProtocol,
    Finish,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from llmserve.errors import InvalidRequest, ServiceUnavailable
from llmserve.params import normalise
from llmserve.protocol import llamacpp as lc
from llmserve.server import sse
from llmserve.server.chat_plan import ChatPlan
from llmserve.server.errors import error_payload
from llmserve.server.generation import (
    Collected,
    Generation,
    Owner,
    borrowed,
    collect,
    fim_prompt_builder,
    messages_for_template,
    model_name,
    relay,
    run_all,
    start,
)
from llmserve.server.requests import parse
from llmserve.server.state import AppState


def prompt_builder(prompt: str | list[int | str]) -> Callable[[EngineProtocol], list[int]]:
    """A string is tokenised as /v1/completions does (with the model's special tokens); a list
    is token ids, with any strings in it tokenised in place (without special tokens)."""

    def build(engine: EngineProtocol) -> list[int]:
        if isinstance(prompt, str):
            return engine.tokenize(prompt, add_special=True)
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return engine.tokenize(prompt[0], add_special=True)
        ids = [p for p in prompt if isinstance(p, int)]
        try:
            engine.detokenize(ids)  # refuses ids outside the vocabulary
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, param="prompt") from None
        tokens: list[int] = []
        for part in prompt:
            tokens += engine.tokenize(part, add_special=False) if isinstance(part, str) else [part]
        return tokens

    return build


def generation_settings(
    sampling: SamplingParams, *, n_ctx: int, model: str, n_predict: int, stop: Sequence[str],
    stream: bool, n_probs: int,
) -> dict[str, Any]:
    settings: dict[str, Any] = {"n_ctx": n_ctx, "n_predict": n_predict, "model": model}
    for f in dataclasses.fields(SamplingParams):
        value = getattr(sampling, f.name)
        settings[f.name] = list(value) if isinstance(value, tuple) else value
    # JSON has no -inf: llama-server writes a banned token's bias as false
    settings["logit_bias"] = [[t, False if math.isinf(b) else b] for t, b in sampling.logit_bias]
    settings["seed"] = -1 if sampling.seed is None else sampling.seed
    settings["grammar"] = sampling.grammar or ""
    settings.update(stop=list(stop), stream=stream, n_probs=n_probs)
    return settings


def settings_of(request: GenerationRequest, *, n_ctx: int, model: str, stream: bool
                ) -> dict[str, Any]:
    return generation_settings(
        request.sampling, n_ctx=n_ctx, model=model, n_predict=request.max_tokens,
        stop=request.stop, stream=stream, n_probs=request.n_probs,
    )


def stop_type(finish: Finish) -> str:
    if finish.reason == "length":
        return "limit"
    if finish.reason == "stop":
        return "word" if finish.stop_word is not None else "eos"
    return "none"  # cancelled (aborted)


class _Pieces:
    """Token id → its text, memoised per request (for completion_probabilities)."""

    def __init__(self, engine: EngineProtocol) -> None:
        self._engine = engine
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self._cache:
            self._cache[token] = self._engine.detokenize([token])
        return self._cache[token]

    def entry(self, token: int, logprob: float) -> dict[str, Any]:
        piece = self(token)
        return {"id": token, "token": piece, "logprob": logprob,
                "bytes": list(piece.encode("utf-8"))}

    def probabilities(self, ev: TokenEvent) -> dict[str, Any]:
        assert ev.logprob is not None
        return {**self.entry(ev.token_id, ev.logprob),
                "top_logprobs": [self.entry(t, lp) for t, lp in ev.top_logprobs]}


def final_fields(gen: Generation, finish: Finish, *, stream: bool) -> dict[str, Any]:
    info = gen.lease.engine.info
    return {
        "model": info.id,
        "tokens_predicted": finish.completion_tokens,
        "tokens_evaluated": finish.prompt_tokens,
        "generation_settings": settings_of(gen.stream.request, n_ctx=info.n_ctx,
                                           model=info.id, stream=stream),
        "stop_type": stop_type(finish),
        "stopping_word": finish.stop_word or "",
        "tokens_cached": finish.cached_tokens,
        "timings": finish.timings.to_dict(),
        # the context, not n_predict, ended the generation
        "truncated": finish.reason == "length"
        and finish.prompt_tokens + finish.completion_tokens >= info.n_ctx,
    }


def completion_body(gen: Generation, result: Collected, *, index: int, n_probs: int,
                    return_tokens: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "index": index,
        "content": result.text,
        "tokens": result.tokens if return_tokens else [],
        "stop": True,
        **final_fields(gen, result.finish, stream=False),
    }
    if n_probs > 0:
        pieces = _Pieces(gen.lease.engine)
        body["completion_probabilities"] = [pieces.probabilities(ev) for ev in result.probs]
    return body


async def completion(request: Request) -> Response | sse.EventStreamResponse:
    req = await parse(request, lc.CompletionRequest)
    return await complete(request, req, prompt_builder(req.prompt))


async def infill(request: Request) -> Response | sse.EventStreamResponse:
    """llama-server's /infill: /completion with a fill-in-the-middle prompt."""
    req = await parse(request, lc.InfillRequest)
    extra = [ExtraFile(chunk.text, chunk.filename) for chunk in req.input_extra]
    return await complete(request, req, fim_prompt_builder(
        req.input_prefix, req.input_suffix, prompt=req.prompt, extra=extra,
        param="input_suffix"))


async def complete(request: Request, req: lc.CompletionRequest,
                   build: Callable[[EngineProtocol], list[int]]
                   ) -> Response | sse.EventStreamResponse:
    state = AppState.of(request)
    if req.n > 1 and req.stream:
        raise InvalidRequest("n > 1 (several completions) needs stream: false", param="n")
    # swipes are req.n separate generations (they may outnumber the slots), not forked choices
    params = dataclasses.replace(normalise(req.wire()), n=1)
    owner = Owner.of(request)

    async def begin(index: int) -> Generation:
        return await start(state.host, build, params.with_seed_offset(index),
                           limits=state.limits, running=state.running, owner=owner)

    if req.stream:
        gen = await begin(0)
        return sse.EventStreamResponse(_completion_chunks(gen, params.n_probs),
                                       on_close=gen.close)

    async def one(index: int) -> dict[str, Any]:
        gen = await begin(index)
        try:
            result = await collect(gen.stream)
            return completion_body(gen, result, index=index, n_probs=params.n_probs,
                                   return_tokens=req.return_tokens)
        finally:
            gen.close()

    works = [functools.partial(one, i) for i in range(req.n)]
    bodies = await sse.until_disconnect(request.receive, lambda: run_all(works, limit=req.n))
    if bodies is None:
        return Response(status_code=499)
    return JSONResponse(bodies if req.n > 1 else bodies[0])


def _completion_chunks(gen: Generation, n_probs: int) -> AsyncGenerator[bytes, None]:
    pieces = _Pieces(gen.lease.engine) if n_probs > 0 else None

    def token(ev: TokenEvent) -> bytes | None:
        if not ev.text and ev.logprob is None:
            return None  # held back (partial character or possible stop string)
        chunk: dict[str, Any] = {
            "index": 0, "content": ev.text,
            "tokens": [ev.token_id] if ev.token_id >= 0 else [], "stop": False,
        }
        if pieces is not None and ev.logprob is not None:
            chunk["completion_probabilities"] = [pieces.probabilities(ev)]
        return sse.event(chunk)

    def final(finish: Finish) -> list[bytes]:
        return [sse.event({"index": 0, "content": "", "tokens": [], "stop": True,
                           **final_fields(gen, finish, stream=True)})]

    return relay(gen, token, final, lambda exc: sse.event(error_payload(exc)))


async def tokenize(request: Request) -> JSONResponse:
    req = await parse(request, lc.TokenizeRequest)
    if not req.parse_special:
        raise InvalidRequest("parse_special: false is not supported; special tokens in the "
                             "text are always parsed", param="parse_special")

    def run(engine: EngineProtocol) -> list[Any]:
        tokens = engine.tokenize(req.content, add_special=req.add_special)
        if not req.with_pieces:
            return list(tokens)
        pieces = _Pieces(engine)
        return [{"id": t, "piece": pieces(t)} for t in tokens]

    return JSONResponse({"tokens": await borrowed(AppState.of(request).host, run, req.model)})


async def detokenize(request: Request) -> JSONResponse:
    req = await parse(request, lc.DetokenizeRequest)
    content = await borrowed(AppState.of(request).host, lambda e: e.detokenize(req.tokens),
                             req.model)
    return JSONResponse({"content": content})


async def apply_template(request: Request) -> JSONResponse:
    req = await parse(request, lc.ApplyTemplateRequest)
    state = AppState.of(request)
    plan = ChatPlan(messages_for_template(req.messages), state.options.chat, tools=req.tools,
                    tool_choice=req.tool_choice, chat_template_kwargs=req.chat_template_kwargs)
    prompt = await borrowed(state.host, plan.render, req.model)
    return JSONResponse({"prompt": prompt})


def build_info() -> str:
    try:
        bindings = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        bindings = "unknown"
    return f"llmserve {__version__} (llama-cpp-python {bindings})"


async def props(request: Request) -> JSONResponse:
    host = AppState.of(request).host
    info = host.current(model_name(host, request.query_params.get("model"))).info
    defaults = generation_settings(SamplingParams(), n_ctx=info.n_ctx, model=info.id,
                                   n_predict=-1, stop=[], stream=False, n_probs=0)
    return JSONResponse({
        "default_generation_settings": {
            "id": 0, "id_task": -1, "n_ctx": info.n_ctx, "speculative": False,
            "is_processing": False, "params": defaults,
        },
        "total_slots": info.n_parallel,
        "model_alias": info.id,
        "model_path": info.path,
        "chat_template": info.chat_template or "",
        "modalities": {"vision": False, "audio": False},
        "build_info": build_info(),
        "is_sleeping": False,
    })


async def slots(request: Request) -> JSONResponse:
    host = AppState.of(request).host
    engine = host.current(model_name(host, request.query_params.get("model")))
    info = engine.info
    states = engine.slot_states()
    if request.query_params.get("fail_on_no_slot") not in (None, "", "0", "false") and all(
        s.is_processing for s in states
    ):
        raise ServiceUnavailable("no slot is free")
    out: list[dict[str, Any]] = []
    for s in states:
        if s.request is not None:
            params = settings_of(s.request, n_ctx=s.n_ctx, model=info.id, stream=False)
            remain = s.request.max_tokens - s.n_decoded
        else:
            params = generation_settings(SamplingParams(), n_ctx=s.n_ctx, model=info.id,
                                         n_predict=-1, stop=[], stream=False, n_probs=0)
            remain = -1
        out.append({
            "id": s.id, "id_task": -1, "n_ctx": s.n_ctx, "speculative": False,
            "is_processing": s.is_processing, "n_past": s.n_cached, "params": params,
            "next_token": {"has_next_token": s.is_processing, "has_new_line": False,
                           "n_remain": remain, "n_decoded": s.n_decoded},
        })
    return JSONResponse(out)


routes = [
    Route("/completion", completion, methods=["POST"]),
    Route("/completions", completion, methods=["POST"]),
    Route("/infill", infill, methods=["POST"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
    # seed 003's OpenAI-prefixed twins (same bodies; ``model`` picks the model)
    Route("/v1/tokenize", tokenize, methods=["POST"]),
    Route("/v1/detokenize", detokenize, methods=["POST"]),
    Route("/apply-template", apply_template, methods=["POST"]),
    Route("/props", props, methods=["GET"]),
    Route("/slots", slots, methods=["GET"]),
]
