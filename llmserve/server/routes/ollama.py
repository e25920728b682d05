"""Ollama's API (its docs/api.md is the contract): POST /api/chat and /api/generate (NDJSON
streams by default, one object with ``stream: false``), GET /api/tags, POST /api/show,
GET /api/version and HEAD /. GET /api/ps lives with the other model listings (models.py).

Pulling, pushing, creating, copying and deleting models answer 501 with a message saying what
to do instead: llmserve serves GGUF files it is given. Every error is ``{"error": message}``
(``@ollama_errors``), mid-stream too, as Ollama's clients expect.

Durations are nanoseconds. ``total_duration`` runs from the request's arrival to its last
object; ``load_duration`` is the model's load time when this request loaded it (else 0);
``prompt_eval_duration`` is the time from submission to the first sampled token (queueing and
reading the prompt), ``eval_duration`` the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from llmserve.chat_output import Answer, ChatOutput, Reasoning
from llmserve.engine.types import EngineProtocol, Finish, SamplingParams, TokenEvent
from llmserve.errors import (
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    NotImplementedHere,
    UnsupportedParameter,
)
from llmserve.gguf_info import ArraySummary
from llmserve.params import Params, normalise
from llmserve.protocol import ollama as ol
from llmserve.reasoning import ReasoningFormat, ReasoningSplitter
from llmserve.registry import KEEP, ModelHost
from llmserve.server import chat_plan, sse
from llmserve.server.chat_plan import ChatPlan
from llmserve.server.errors import error_payload, ollama_errors
from llmserve.server.generation import (
    Generation,
    Owner,
    collect_or_abandon,
    model_name,
    relay,
    start,
)
from llmserve.server.requests import parse
from llmserve.server.routes.models import (
    ModelView,
    iso_time,
    ollama_details,
    ollama_digest,
    views,
)
from llmserve.server.state import AppState
from llmserve.tool_calls import Content

# The Ollama API level answered here (docs/api.md with think, structured outputs and
# /api/ps's context_length); clients compare it to enable features.
OLLAMA_VERSION = "0.9.0"

NS = 1_000_000_000


def _now() -> str:
    return iso_time(time.time())


def _resolve(host: ModelHost, name: str) -> str:
    """The model id an Ollama name means; ``name:latest`` also finds ``name`` (Ollama's
    default tag, which its clients add)."""
    try:
        resolved = model_name(host, name)
    except ModelNotFound:
        if not name.endswith(":latest"):
            raise
        resolved = model_name(host, name.removesuffix(":latest"))
    return resolved or host.resolve(None).id


def _loaded(host: ModelHost, model_id: str) -> bool:
    return any(s.spec.id == model_id and s.state == "loaded" for s in host.statuses())


def _thinking_kwargs(req: ol.ChatRequest | ol.GenerateRequest) -> dict[str, Any]:
    """The chat template's arguments for ``think``: false turns a reasoning template's thinking
    off, true turns it on, a level also reaches templates that take one (gpt-oss's
    ``reasoning_effort``)."""
    if req.think is None:
        return {}
    if req.think is False:
        return {"enable_thinking": False}
    level = {"reasoning_effort": req.think} if isinstance(req.think, str) else {}
    return {"enable_thinking": True, **level}


def _reasoning(req: ol.ChatRequest | ol.GenerateRequest) -> ReasoningFormat:
    """As Ollama: the thinking comes apart from the answer (``thinking``) only when asked for
    with ``think``; otherwise it stays in the text."""
    return "none" if req.think is None or req.think is False else "deepseek"


@dataclasses.dataclass
class _Run:
    """One generation's bookkeeping for the final object."""

    model: str
    t0: float
    load_ns: int

    def final(self, finish: Finish) -> dict[str, Any]:
        timings = finish.timings
        return {
            "done": True,
            "done_reason": "length" if finish.reason == "length" else "stop",
            "total_duration": int((time.perf_counter() - self.t0) * NS),
            "load_duration": self.load_ns,
            "prompt_eval_count": finish.prompt_tokens,
            "prompt_eval_duration": int(timings.prompt_ms * 1_000_000),
            "eval_count": finish.completion_tokens,
            "eval_duration": int(timings.predicted_ms * 1_000_000),
        }


async def _start(
    request: Request, req: ol.ChatRequest | ol.GenerateRequest,
    build: Callable[[EngineProtocol], list[int]], t0: float,
    constrain: Callable[[SamplingParams], SamplingParams] | None = None,
) -> tuple[Generation, _Run]:
    state = AppState.of(request)
    params: Params = normalise(req.wire())
    model_id = _resolve(state.host, req.model)
    was_loaded = _loaded(state.host, model_id)
    gen = await start(state.host, build, dataclasses.replace(params, model=model_id),
                      limits=state.limits, running=state.running, owner=Owner.of(request),
                      constrain=constrain)
    load_ns = 0 if was_loaded else int(gen.lease.engine.info.load_seconds * NS)
    return gen, _Run(req.model, t0, load_ns)


async def _load_or_unload(request: Request, req: ol.ChatRequest | ol.GenerateRequest,
                          empty: dict[str, Any]) -> Response:
    """An empty prompt (or messages): load the model, or with keep_alive 0 unload it."""
    host = AppState.of(request).host
    model_id = _resolve(host, req.model)
    if req.keep_alive_zero:
        if _loaded(host, model_id):
            await host.unload(model_id)
        reason = "unload"
    else:
        keep = req.keep_alive_seconds()
        (await host.acquire(model_id, KEEP if keep == "model" else keep)).release()
        reason = "load"
    return JSONResponse({"model": req.model, "created_at": _now(), **empty, "done": True,
                         "done_reason": reason})


async def _answer(
    request: Request, gen: Generation, run: _Run, stream: bool,
    piece: Callable[[str], dict[str, Any]],
    final: Callable[[Finish, list[int]], dict[str, Any]],
) -> Response:
    """Both endpoints' answer: ``piece`` renders some text as the endpoint's fields, ``final``
    the last object's own fields (given the generated token ids)."""
    if not stream:
        result = await collect_or_abandon(request, gen)
        if result is None:
            return Response(status_code=499)
        return JSONResponse({"model": run.model, "created_at": _now(), **piece(result.text),
                             **final(result.finish, result.tokens),
                             **run.final(result.finish)})
    tokens: list[int] = []

    def token(ev: TokenEvent) -> bytes | None:
        if ev.token_id >= 0:
            tokens.append(ev.token_id)
        if not ev.text:
            return None
        return sse.ndjson_line({"model": run.model, "created_at": _now(), **piece(ev.text),
                                "done": False})

    def finish(f: Finish) -> Iterable[bytes]:
        yield sse.ndjson_line({"model": run.model, "created_at": _now(), **piece(""),
                               **final(f, tokens), **run.final(f)})

    body = relay(gen, token, finish, lambda exc: sse.ndjson_line(error_payload(exc, "ollama")))
    return sse.NdjsonStreamResponse(body, on_close=gen.close)


async def _parsed_answer(
    request: Request, gen: Generation, run: _Run, stream: bool, plan: ChatPlan,
    output: ChatOutput, field: str,
) -> Response:
    """An answer parsed as it grows (``think``, ``tools``): the thinking goes to ``thinking``,
    the text to ``field`` (a message's ``content`` or ``response``), tool calls as whole
    objects (Ollama sends each call complete, with its arguments as an object)."""
    shape = _message if field == "message" else _response
    if not stream:
        result = await collect_or_abandon(request, gen)
        if result is None:
            return Response(status_code=499)
        answer = chat_plan.collect(plan, output, result.text)
        return JSONResponse({"model": run.model, "created_at": _now(),
                             **shape(answer.content or "", answer.reasoning, _calls(answer)),
                             **run.final(result.finish)})

    def lines(pieces: list[Any]) -> bytes | None:
        thinking = "".join(p.text for p in pieces if isinstance(p, Reasoning))
        text = "".join(p.text for p in pieces if isinstance(p, Content))
        if not thinking and not text:
            return None
        return sse.ndjson_line({"model": run.model, "created_at": _now(),
                                **shape(text, thinking or None, []), "done": False})

    def token(ev: TokenEvent) -> bytes | None:
        return lines(output.feed(ev.text)) if ev.text else None

    def finish(f: Finish) -> Iterable[bytes]:
        last = lines(output.finish())
        if last is not None:
            yield last
        answer = output.answer()
        plan.check(answer)
        yield sse.ndjson_line({"model": run.model, "created_at": _now(),
                               **shape("", None, _calls(answer)), **run.final(f)})

    body = relay(gen, token, finish, lambda exc: sse.ndjson_line(error_payload(exc, "ollama")))
    return sse.NdjsonStreamResponse(body, on_close=gen.close)


def _calls(answer: Answer) -> list[dict[str, Any]]:
    out = []
    for call in answer.calls:
        try:
            arguments = json.loads(call.arguments)
        except ValueError:  # as the model wrote it
            arguments = call.arguments
        out.append({"function": {"name": call.name, "arguments": arguments}})
    return out


# -- generation ------------------------------------------------------------------------------


def chat_messages(messages: list[ol.Message]) -> list[dict[str, Any]]:
    """Ollama messages as the chat template sees them, in OpenAI's vocabulary: an assistant's
    tool calls get ids, and each ``role: tool`` message answers the earliest call still open
    (of the function it names in ``tool_name``, when it names one), as Ollama pairs them."""
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []  # (id, function name)
    for i, m in enumerate(messages):
        if m.images:
            raise InvalidRequest(f"invalid 'messages[{i}].images': images are not supported: "
                                 "this server runs text-only models", param=f"messages[{i}].images")
        message: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            message["tool_calls"] = [_openai_call(i, j, call)
                                     for j, call in enumerate(m.tool_calls)]
            open_calls += [(c["id"], c["function"]["name"]) for c in message["tool_calls"]]
        if m.role == "tool":
            match = next((c for c in open_calls if m.tool_name in (None, c[1])), None)
            if match is None:
                raise InvalidRequest(
                    f"invalid 'messages[{i}]': a tool result with no earlier tool call "
                    + (f"to {m.tool_name!r} " if m.tool_name else "") + "to answer",
                    param=f"messages[{i}]")
            open_calls.remove(match)
            message["tool_call_id"] = match[0]
            if m.tool_name:
                message["name"] = m.tool_name
        out.append(message)
    return out


def _openai_call(i: int, j: int, call: Any) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest(f"invalid 'messages[{i}].tool_calls[{j}]': expected "
                             '{"function": {"name": ..., "arguments": {...}}}',
                             param=f"messages[{i}].tool_calls[{j}]")
    arguments = fn.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    return {"id": f"call_{i}_{j}", "type": "function",
            "function": {"name": fn["name"], "arguments": arguments}}


@ollama_errors
async def chat(request: Request) -> Response:
    t0 = time.perf_counter()
    req = await parse(request, ol.ChatRequest)
    if not req.messages:
        return await _load_or_unload(request, req, _message(""))
    plan = ChatPlan(chat_messages(req.messages), AppState.of(request).options.chat,
                    tools=req.tools, chat_template_kwargs=_thinking_kwargs(req),
                    reasoning=_reasoning(req))
    gen, run = await _start(request, req, plan.build, t0, plan.constrain)
    output = plan.output()
    if output.active:
        return await _parsed_answer(request, gen, run, req.stream, plan, output, "message")
    return await _answer(request, gen, run, req.stream, _message, lambda _finish, _tokens: {})


def _message(text: str, thinking: str | None = None,
             calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking:
        message["thinking"] = thinking
    if calls:
        message["tool_calls"] = calls
    return {"message": message}


def _response(text: str, thinking: str | None = None,
              _calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"response": text, **({"thinking": thinking} if thinking else {})}


@ollama_errors
async def generate(request: Request) -> Response:
    t0 = time.perf_counter()
    req = await parse(request, ol.GenerateRequest)
    for name in ("suffix", "template"):
        if getattr(req, name):
            raise UnsupportedParameter(
                f"'{name}' is not supported by this server yet; leave it out"
                + (" (the model's own chat template is used)" if name == "template" else ""),
                param=name)
    if req.images:
        raise InvalidRequest("invalid 'images': images are not supported: this server runs "
                             "text-only models", param="images")
    template_kwargs = _thinking_kwargs(req)
    if not req.prompt and not req.context:
        return await _load_or_unload(request, req, {"response": ""})
    messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
        {"role": "user", "content": req.prompt}]
    context = list(req.context or [])

    splitter = ReasoningSplitter(False)

    def build(engine: EngineProtocol) -> list[int]:
        nonlocal splitter
        if context:
            try:
                engine.detokenize(context)  # refuses ids outside the vocabulary
            except InvalidRequest as exc:
                raise InvalidRequest(f"invalid 'context': {exc.message}", param="context") from None
        text = req.prompt if req.raw else engine.format_chat(messages, **template_kwargs)
        splitter = ReasoningSplitter.plan(_reasoning(req), engine.info.chat_template or "", text)
        return context + engine.tokenize(text, add_special=not context)

    gen, run = await _start(request, req, build, t0)
    if splitter.enabled:  # think: the thinking apart, in ``thinking``
        plan = ChatPlan(messages, AppState.of(request).options.chat)
        return await _parsed_answer(request, gen, run, req.stream, plan,
                                    ChatOutput(splitter, None), "response")
    prompt = gen.prompt_tokens

    def final(_finish: Finish, tokens: list[int]) -> dict[str, Any]:
        # the conversation so far, to send back as the next request's context (not in raw mode,
        # as Ollama)
        return {} if req.raw else {"context": prompt + tokens}

    return await _answer(request, gen, run, req.stream, lambda text: {"response": text}, final)


# -- models --------------------------------------------------------------------------------


def _modified_at(view: ModelView) -> str:
    try:
        return iso_time(view.status.spec.path.stat().st_mtime)
    except OSError:
        return iso_time(0)


@ollama_errors
async def tags(request: Request) -> JSONResponse:
    models = [
        {"name": v.id, "model": v.id, "modified_at": _modified_at(v), "size": v.size,
         "digest": ollama_digest(v), "details": ollama_details(v)}
        for v in await views(AppState.of(request).host)
    ]
    return JSONResponse({"models": models})


def _json_value(value: Any) -> Any:
    if isinstance(value, ArraySummary):  # long arrays (the vocabulary) are not kept
        return []
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


# Ollama's option names for the [sampling] keys a model may configure (same spelling)
_OPTION_NAMES = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty",
                 "repeat_last_n", "presence_penalty", "frequency_penalty", "mirostat",
                 "mirostat_tau", "mirostat_eta", "seed")


def _parameters(view: ModelView) -> list[tuple[str, Any]]:
    """The model's configured defaults under Ollama's option names, and its context."""
    spec, info, gguf = view.status.spec, view.status.info, view.gguf
    out = [(k, v) for k, v in spec.sampling.items() if k in _OPTION_NAMES and v is not None]
    n_ctx = info.n_ctx if info else (spec.ctx_size or (gguf.context_length if gguf else None))
    if n_ctx:
        out.append(("num_ctx", n_ctx))
    return out


@ollama_errors
async def show(request: Request) -> JSONResponse:
    req = await parse(request, ol.ShowRequest)
    host = AppState.of(request).host
    model_id = _resolve(host, req.target)
    status = next(s for s in host.statuses() if s.spec.id == model_id)
    view = (await views(host, [status]))[0]
    gguf = view.gguf
    if gguf is None:
        raise ModelLoadError(view.error or f"cannot read {status.spec.path}", param="model")
    info = view.status.info
    template = (info.chat_template if info else None) or gguf.chat_template or ""
    model_info = {k: _json_value(v) for k, v in gguf.metadata.items()
                  if k != "tokenizer.chat_template"}
    model_info["general.parameter_count"] = gguf.parameter_count
    parameters = _parameters(view)
    modelfile = "\n".join([
        f"# Modelfile of {view.id}, served by llmserve from a GGUF file",
        f"FROM {status.spec.path}",
        *(f"PARAMETER {k} {v}" for k, v in parameters),
    ])
    license_ = gguf.metadata.get("general.license")
    arch = gguf.architecture
    embedding = f"{arch}.pooling_type" in gguf.metadata
    return JSONResponse({
        "license": license_ if isinstance(license_, str) else "",
        "modelfile": modelfile,
        "parameters": "\n".join(f"{k:<30} {v}" for k, v in parameters),
        "template": template,
        "details": ollama_details(view),
        "model_info": model_info,
        "capabilities": ["embedding"] if embedding else ["completion"],
        "modified_at": _modified_at(view),
    })


async def version(_request: Request) -> JSONResponse:
    return JSONResponse({"version": OLLAMA_VERSION})


async def running(_request: Request) -> Response:
    """HEAD /: Ollama's CLI checks that the server is up this way."""
    return PlainTextResponse("llmserve is running")


# -- model management: not offered ---------------------------------------------------------

_HOWTO = ("llmserve serves local GGUF files; download a .gguf (for example from Hugging Face) "
          "and start `llmserve run FILE.gguf`, or put it in --models-dir")


def _refusal(what: str) -> Callable[[Request], Any]:
    async def refuse(request: Request) -> Response:
        req = await parse(request, ol.ManageRequest) if (await request.body()).strip() else None
        name = (req.model or req.name or req.source) if req is not None else None
        target = repr(name) if name else "models"
        raise NotImplementedHere(f"cannot {what} {target}: {_HOWTO}")

    return ollama_errors(refuse)


routes = [
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/version", version, methods=["GET"]),
    Route("/", running, methods=["HEAD"]),
    Route("/api/pull", _refusal("pull"), methods=["POST"]),
    Route("/api/push", _refusal("push"), methods=["POST"]),
    Route("/api/create", _refusal("create"), methods=["POST"]),
    Route("/api/copy", _refusal("copy"), methods=["POST"]),
    Route("/api/delete", _refusal("delete"), methods=["DELETE"]),
]
