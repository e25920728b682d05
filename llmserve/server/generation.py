"""From an admitted request to engine events: prompt preparation, limits, sampling, collection.

Shared by every generating route (OpenAI's, llama.cpp's, KoboldCpp's and the seed's native ones),
so each route only translates its protocol. Every started Generation is listed in a
RunningGenerations registry (on AppState) until it is closed, so POST /api/extra/abort can stop
it from another request. For the same reason metrics, the access log and graceful shutdown hook
in here: ``start`` hands each Generation to the request's GenerationObserver (a context variable
the request-tracking middleware sets), which sees every event the route consumes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio.to_thread
from starlette.requests import Request

from llmserve.engine.fim import ExtraFile, infill_prompt
from llmserve.engine.types import (
    EngineProtocol,
    Finish,
    GenerationRequest,
    GenerationStream,
    SamplingParams,
    TokenEvent,
)
from llmserve.errors import (
    ContextLengthExceeded,
    EngineError,
    InvalidRequest,
    LlmserveError,
    NoFimTokens,
)
from llmserve.params import Params
from llmserve.protocol import openai as oa
from llmserve.registry import KEEP, Lease, ModelHost
from llmserve.server import sse

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """Server-side ceiling on generated tokens (``--max-tokens-limit``); None = context only."""

    max_tokens_limit: int | None = None


async def prepare(
    engine: EngineProtocol, build: Callable[[EngineProtocol], list[int]],
    sampling: SamplingParams,
    constrain: Callable[[SamplingParams], SamplingParams] | None = None,
) -> tuple[list[int], SamplingParams]:
    """Template + tokenise, and check the sampling parameters against the model (grammar,
    token ids), off the event loop. ``constrain`` (after ``build``: what it adds may depend on
    the rendered prompt, e.g. a tool-call grammar) adjusts the sampling first."""

    def work() -> tuple[list[int], SamplingParams]:
        prompt = build(engine)
        return prompt, engine.prepare_sampling(constrain(sampling) if constrain else sampling)

    return await anyio.to_thread.run_sync(work)


def resolve_max_tokens(
    n_prompt: int, requested: int | None, n_ctx: int, limits: Limits, *,
    cap_to_context: bool = False,
) -> int:
    """How many tokens may be generated; raise before any byte is sent if it cannot fit.

    ``cap_to_context`` (the native routes, like llama-server and KoboldCpp): a request for more
    than the context has room for gets what fits instead of a 400 (OpenAI routes stay strict).
    """
    room = n_ctx - n_prompt
    if requested is not None:
        if requested > room and not (cap_to_context and room >= 1):
            raise ContextLengthExceeded(n_prompt, requested, n_ctx)
        budget = min(requested, room)
    else:
        if room < 1:
            raise ContextLengthExceeded(n_prompt, 0, n_ctx)
        budget = room
    if limits.max_tokens_limit is not None:
        budget = min(budget, limits.max_tokens_limit)
    return budget


def context_window(params: Params, n_ctx: int) -> int:
    """The context a request may fill: the model's, or the smaller one the client asked for.
    Asking for more than the model was loaded with is refused (the context is fixed at load
    time, and silently using less would cut generations the client expects to fit)."""
    if params.n_ctx is None:
        return n_ctx
    if params.n_ctx > n_ctx:
        wire = params.wire_name("n_ctx")
        raise InvalidRequest(
            f"invalid '{wire}': the model is loaded with a context of {n_ctx} tokens, less "
            f"than the {params.n_ctx} asked for; ask for at most {n_ctx}, or restart llmserve "
            f"with --ctx-size {params.n_ctx}", param=wire)
    return params.n_ctx


def messages_for_template(messages: Sequence[oa.ChatMessage]) -> list[dict[str, Any]]:
    """Chat messages as the Jinja template sees them (text only; extra keys kept)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        try:
            text = m.text()
        except ValueError as exc:
            raise InvalidRequest(str(exc), param=f"messages[{i}].content") from None
        message: dict[str, Any] = {**(m.model_extra or {}), "role": m.role, "content": text}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def fim_prompt_builder(
    prefix: str, suffix: str, *, prompt: str = "", extra: Sequence[ExtraFile] = (),
    param: str,
) -> Callable[[EngineProtocol], list[int]]:
    """A fill-in-the-middle prompt (``engine.fim.infill_prompt``); a model without FIM tokens
    is refused (NoFimTokens naming ``param``) before anything is generated."""

    def build(engine: EngineProtocol) -> list[int]:
        fim = engine.fim_tokens()
        if fim is None:
            raise NoFimTokens(
                f"invalid '{param}': fill-in-the-middle needs a model with FIM tokens, and "
                f"{engine.info.id} has none in its vocabulary (tokenizer.ggml.fim_pre_token_id, "
                "fim_suf_token_id, fim_mid_token_id)", param=param)
        return infill_prompt(fim, lambda text: engine.tokenize(text, add_special=False),
                             prefix=prefix, suffix=suffix, prompt=prompt, extra=extra)

    return build


def model_name(host: ModelHost, requested: str | None) -> str | None:
    """The model a request names — an id, an alias or a known model's GGUF path — as the id
    to hand ``ModelHost.acquire``/``borrow``/``current``; None (no name) is the host's
    default. An unknown name is a 404 listing the known ids (when several are known: with one,
    any name is that model, as clients send arbitrary ones). Every route family resolves its
    ``model`` here."""
    if not requested:
        return None
    for status in host.statuses():
        paths = {str(status.spec.path)}
        if status.info is not None:
            paths.add(status.info.path)
        if requested in paths:
            return status.spec.id
    return host.resolve(requested).id


@dataclass
class Collected:
    text: str
    finish: Finish
    tokens: list[int] = field(default_factory=list)
    # one per generated token when the request asked for n_probs
    probs: list[TokenEvent] = field(default_factory=list)


@dataclass(frozen=True)
class Interrupted(Finish):
    """The server ended the generation (``Generation.abort``); routes meet ``cause`` as an
    exception: a JSON error, or an SSE error event then [DONE]."""


def check_finish(finish: Finish) -> Finish:
    if finish.cause is not None:
        raise finish.cause
    if finish.reason == "error":
        raise EngineError(f"generation failed: {finish.error or 'engine error'}")
    return finish


async def collect(stream: GenerationStream) -> Collected:
    parts: list[str] = []
    tokens: list[int] = []
    probs: list[TokenEvent] = []
    async for ev in stream:
        if isinstance(ev, TokenEvent):
            parts.append(ev.text)
            if ev.token_id >= 0:
                tokens.append(ev.token_id)
                if ev.logprob is not None:
                    probs.append(ev)
        else:
            return Collected("".join(parts), check_finish(ev), tokens, probs)
    raise EngineError("the generation ended without a result")


async def collect_or_abandon(request: Request, gen: Generation) -> Collected | None:
    """The whole generation, or None when the client leaves first (it is cancelled then).
    Closes ``gen`` either way."""
    try:
        return await sse.until_disconnect(request.receive, lambda: collect(gen.stream))
    finally:
        gen.close()


async def borrowed(host: ModelHost, work: Callable[[EngineProtocol], T],
                   model: str | None = None) -> T:
    """Run a quick engine read (tokenise, detokenise, render a template) on the model a
    request names, off the event loop, holding the engine so it cannot be unloaded
    underneath."""
    lease = host.borrow(model_name(host, model))
    try:
        return await anyio.to_thread.run_sync(work, lease.engine)
    finally:
        lease.release()


async def relay(
    gen: Generation,
    token: Callable[[TokenEvent], bytes | None],
    finish: Callable[[Finish], Iterable[bytes]],
    error: Callable[[Exception], bytes],
    *,
    opening: Iterable[bytes] = (),
    done: bool = False,
) -> AsyncGenerator[bytes, None]:
    """A generation as a streamed body, the one loop every route family's SSE shares:
    ``opening`` first, ``token`` renders each TokenEvent (None: nothing to send), ``finish``
    the last event(s); a failure, also one met mid-stream, becomes ``error``'s event. Closes
    ``gen`` however the body ends; ``done`` ends the stream with ``data: [DONE]``."""
    try:
        for chunk in opening:
            yield chunk
        async for ev in gen.events():
            if isinstance(ev, TokenEvent):
                out = token(ev)
                if out is not None:
                    yield out
                continue
            for chunk in finish(check_finish(ev)):
                yield chunk
    except Exception as exc:
        yield error(exc)
    finally:
        gen.close()
    if done:
        yield sse.DONE


@dataclass(frozen=True)
class Owner:
    """Who started a generation, for POST /api/extra/abort: the client's address and the
    KoboldCpp ``genkey`` it sent, if any."""

    client: str
    genkey: str | None = None

    @staticmethod
    def of(request: Request, genkey: str | None = None) -> Owner:
        return Owner(request.client.host if request.client else "", genkey or None)


class RunningGenerations:
    """Generations from start until close. Event-loop only, so no locks."""

    def __init__(self) -> None:
        self._owners: dict[int, tuple[Owner, Generation]] = {}

    def add(self, gen: Generation, owner: Owner) -> None:
        self._owners[id(gen)] = (owner, gen)

    def discard(self, gen: Generation) -> None:
        self._owners.pop(id(gen), None)

    def __len__(self) -> int:
        return len(self._owners)

    def abort(self, *, client: str, genkey: str | None) -> int:
        """Cancel the caller's generations: those started with ``genkey`` when one is given
        (from any address: the key is the identity), else those this client address started
        without a key. Returns how many were cancelled (running or still queued)."""
        hits = [
            gen for owner, gen in self._owners.values()
            if (owner.genkey == genkey if genkey else
                owner.genkey is None and owner.client == client)
        ]
        for gen in hits:
            gen.stream.cancel()
        return len(hits)


@dataclass
class Generation:
    """An admitted, tokenised, submitted request. ``close`` (idempotent) cancels the generation
    if it still runs, gives the admission place back and leaves the running registry; every
    route calls it in ``finally``."""

    lease: Lease
    stream: GenerationStream
    prompt_tokens: list[int]
    running: RunningGenerations | None = None
    # the other choices (OpenAI ``n`` > 1): ``stream`` is choice 0, forks[i] choice i + 1
    forks: Sequence[GenerationStream] = ()

    @property
    def streams(self) -> list[GenerationStream]:
        return [self.stream, *self.forks]

    def close(self) -> None:
        for stream in self.streams:
            if not stream.finished:
                stream.cancel()
        self.lease.release()
        if self.running is not None:
            self.running.discard(self)

    def events(self) -> AsyncIterator[TokenEvent | Finish]:
        """Every choice's events as they come, each marked with its ``choice``; it ends when
        every choice has finished."""
        if not self.forks:
            return self.stream.__aiter__()
        return merged_choices(self.streams)

    def abort(self, cause: LlmserveError) -> None:
        """End the generation now with ``cause`` (the route sees it at its next event). The
        Interrupted event is queued before the engine can answer the cancel with its own
        Finish, so the route meets the cause, not a plain "cancelled"."""
        if self.stream.finished:
            return
        self.stream.push(Interrupted("error", len(self.prompt_tokens), 0, error=cause.message,
                                     cause=cause))
        for stream in self.streams:
            stream.cancel()


async def merged_choices(streams: Sequence[GenerationStream]
                         ) -> AsyncIterator[TokenEvent | Finish]:
    """The events of several choices' streams in arrival order, each marked with its index."""
    queue: asyncio.Queue[TokenEvent | Finish] = asyncio.Queue()

    async def pump(index: int, stream: GenerationStream) -> None:
        async for event in stream:
            queue.put_nowait(dataclasses.replace(event, choice=index))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            event = await queue.get()
            left -= isinstance(event, Finish)
            yield event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_choices_or_abandon(request: Request, gen: Generation
                                     ) -> list[Collected] | None:
    """Every choice's whole generation, in order, or None when the client leaves first (they
    are cancelled then). Closes ``gen`` either way."""
    try:
        return await sse.until_disconnect(
            request.receive, lambda: asyncio.gather(*(collect(s) for s in gen.streams)))
    finally:
        gen.close()


class GenerationObserver(Protocol):
    """Told about each Generation of the current request and every event its route takes."""

    def started(self, generation: Generation) -> None: ...

    def event(self, generation: Generation, event: TokenEvent | Finish) -> None: ...


generation_observer: ContextVar[GenerationObserver | None] = ContextVar(
    "llmserve_generation_observer", default=None
)
# True while a batch line runs: its generations are background ones (GenerationRequest), which
# the scheduler puts behind interactive requests. Set by the batch runner around each line.
background_work: ContextVar[bool] = ContextVar("llmserve_background_work", default=False)


async def start(
    host: ModelHost,
    build_prompt: Callable[[EngineProtocol], list[int]],
    params: Params,
    *,
    limits: Limits,
    running: RunningGenerations | None = None,
    owner: Owner | None = None,
    constrain: Callable[[SamplingParams], SamplingParams] | None = None,
) -> Generation:
    """Admit (loading ``params.model`` first if needed), prepare and submit. Admission comes
    first (503 before any templating); on any later error the admission place is given back
    before raising. The model's configured sampling defaults fill what the client left unset
    (``Params.sampling``). With ``running`` the generation is registered (under ``owner``) until
    it is closed. An engine-side sampling error names the field as the client sent it."""
    keep_alive = KEEP if params.keep_alive == "model" else params.keep_alive
    lease = await host.acquire(model_name(host, params.model), keep_alive)
    engine = lease.engine
    try:
        try:
            prompt, sampling = await prepare(engine, build_prompt,
                                             params.sampling(lease.sampling_defaults), constrain)
        except InvalidRequest as exc:
            if exc.param is not None and params.wire_name(exc.param) != exc.param:
                wire = params.wire_name(exc.param)
                exc.message = exc.message.replace(f"'{exc.param}'", f"'{wire}'")
                exc.param = wire
                exc.args = (exc.message,)
            raise
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        max_tokens = resolve_max_tokens(
            len(prompt), params.max_tokens, context_window(params, engine.info.n_ctx), limits,
            cap_to_context=params.cap_to_context,
        )
        request = GenerationRequest(prompt_tokens=prompt, max_tokens=max_tokens,
                                    sampling=sampling, stop=params.stop, n_probs=params.n_probs,
                                    lora=params.lora, background=background_work.get())
        stream, *forks = engine.submit_choices(choices(request, params.n))
    except BaseException:
        lease.release()
        raise
    generation = Generation(lease, stream, prompt, running, forks)
    if running is not None:
        running.add(generation, owner or Owner(""))
    observer = generation_observer.get()
    if observer is not None:
        watch(generation, observer)
        observer.started(generation)
    return generation


def watch(generation: Generation, observer: GenerationObserver) -> None:
    """Show ``observer`` every choice's tokens, and the Finish of the last choice to end."""
    unfinished = len(generation.streams)

    def seen(event: TokenEvent | Finish) -> None:
        nonlocal unfinished
        if isinstance(event, Finish):
            unfinished -= 1
            if unfinished:
                return
        observer.event(generation, event)

    for stream in generation.streams:
        stream.on_event = seen


def choices(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """``n`` choices of ``request``: with a seed, choice i samples with seed + i, so they
    differ from each other and each is reproducible (llama-server's swipes do the same)."""
    seed = request.sampling.seed
    return [request if seed is None or not i else dataclasses.replace(
        request, sampling=dataclasses.replace(request.sampling, seed=seed + i))
        for i in range(n)]


async def run_all(works: Sequence[Callable[[], Awaitable[T]]], *, limit: int) -> list[T]:
    """Run ``works`` with at most ``limit`` at once; results in input order. The first failure
    cancels the rest (each work closes its own Generation in ``finally``) and is raised."""
    gate = asyncio.Semaphore(max(1, limit))

    async def one(work: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await work()

    tasks = [asyncio.ensure_future(one(w)) for w in works]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
