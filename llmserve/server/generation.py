"""From an admitted request to engine events: prompt preparation, limits, sampling, collection.

Shared by every generating route (OpenAI's and, later, llama.cpp's native ones), so each route
only translates its protocol. For the same reason metrics, the access log and graceful shutdown
hook in here: ``start`` hands each Generation to the request's GenerationObserver (a context
variable the request-tracking middleware sets), which sees every event the route consumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping
from collections.abc import Set as AbstractSet
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio.to_thread

from llmserve.engine.types import (
    EngineProtocol,
    Finish,
    GenerationRequest,
    GenerationStream,
    SamplingParams,
    TokenEvent,
)
from llmserve.errors import ContextLengthExceeded, EngineError, InvalidRequest, LlmserveError
from llmserve.registry import KEEP, Lease, ModelHost


@dataclass(frozen=True)
class Limits:
    """Server-side ceiling on generated tokens (``--max-tokens-limit``); None = context only."""

    max_tokens_limit: int | None = None


async def prepare_prompt(
    engine: EngineProtocol, build: Callable[[EngineProtocol], list[int]]
) -> list[int]:
    """Template + tokenise off the event loop."""
    return await anyio.to_thread.run_sync(build, engine)


def resolve_max_tokens(
    n_prompt: int, requested: int | None, n_ctx: int, limits: Limits
) -> int:
    """How many tokens may be generated; raise before any byte is sent if it cannot fit."""
    room = n_ctx - n_prompt
    if requested is not None:
        if requested > room:
            raise ContextLengthExceeded(n_prompt, requested, n_ctx)
        budget = requested
    else:
        if room < 1:
            raise ContextLengthExceeded(n_prompt, 0, n_ctx)
        budget = room
    if limits.max_tokens_limit is not None:
        budget = min(budget, limits.max_tokens_limit)
    return budget


def logit_bias_pairs(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    pairs: list[tuple[int, float]] = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequest(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
        pairs.append((token, float(value)))
    return tuple(pairs)


@dataclass
class Collected:
    text: str
    finish: Finish
    tokens: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Interrupted(Finish):
    """The server ended the generation (``Generation.abort``); routes meet ``cause`` as an
    exception: a JSON error, or an SSE error event then [DONE]."""

    cause: LlmserveError | None = None


def check_finish(finish: Finish) -> Finish:
    if isinstance(finish, Interrupted) and finish.cause is not None:
        raise finish.cause
    if finish.reason == "error":
        raise EngineError(f"generation failed: {finish.error or 'engine error'}")
    return finish


async def collect(stream: GenerationStream) -> Collected:
    parts: list[str] = []
    tokens: list[int] = []
    async for ev in stream:
        if isinstance(ev, TokenEvent):
            parts.append(ev.text)
            if ev.token_id >= 0:
                tokens.append(ev.token_id)
        else:
            return Collected("".join(parts), check_finish(ev), tokens)
    raise EngineError("the generation ended without a result")


@dataclass
class Generation:
    """An admitted, tokenised, submitted request. ``close`` (idempotent) cancels the generation
    if it still runs and gives the admission place back; every route calls it in ``finally``."""

    lease: Lease
    stream: GenerationStream
    prompt_tokens: list[int]

    def close(self) -> None:
        if not self.stream.finished:
            self.stream.cancel()
        self.lease.release()

    def events(self) -> AsyncIterator[TokenEvent | Finish]:
        return self.stream.__aiter__()

    def abort(self, cause: LlmserveError) -> None:
        """End the generation now with ``cause`` (the route sees it at its next event). The
        Interrupted event is queued before the engine can answer the cancel with its own
        Finish, so the route meets the cause, not a plain "cancelled"."""
        if self.stream.finished:
            return
        self.stream.push(Interrupted("error", len(self.prompt_tokens), 0, error=cause.message,
                                     cause=cause))
        self.stream.cancel()


class GenerationObserver(Protocol):
    """Told about each Generation of the current request and every event its route takes."""

    def started(self, generation: Generation) -> None: ...

    def event(self, generation: Generation, event: TokenEvent | Finish) -> None: ...


generation_observer: ContextVar[GenerationObserver | None] = ContextVar(
    "llmserve_generation_observer", default=None
)


def with_model_defaults(
    sampling: SamplingParams, defaults: Mapping[str, Any], explicit: AbstractSet[str]
) -> SamplingParams:
    """The model's configured sampling defaults for every field the request did not set."""
    fill = {k: v for k, v in defaults.items() if k not in explicit}
    return dataclasses.replace(sampling, **fill) if fill else sampling


async def start(
    host: ModelHost,
    build_prompt: Callable[[EngineProtocol], list[int]],
    *,
    requested_max_tokens: int | None,
    sampling: SamplingParams,
    stop: list[str],
    limits: Limits,
    model: str | None = None,
    keep_alive: object = KEEP,
    explicit_sampling: AbstractSet[str] = frozenset(),
) -> Generation:
    """Admit (loading ``model`` first if needed), prepare and submit. Admission comes first
    (503 before any templating); on any later error the admission place is given back before
    raising. ``explicit_sampling``: the sampling fields the request set, which the model's
    configured defaults do not override."""
    lease = await host.acquire(model, keep_alive)
    engine = lease.engine
    try:
        sampling = with_model_defaults(sampling, lease.sampling_defaults, explicit_sampling)
        prompt = await prepare_prompt(engine, build_prompt)
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        max_tokens = resolve_max_tokens(
            len(prompt), requested_max_tokens, engine.info.n_ctx, limits
        )
        stream = engine.submit(
            GenerationRequest(prompt_tokens=prompt, max_tokens=max_tokens, sampling=sampling,
                              stop=stop)
        )
    except BaseException:
        lease.release()
        raise
    generation = Generation(lease, stream, prompt)
    observer = generation_observer.get()
    if observer is not None:
        stream.on_event = lambda event: observer.event(generation, event)
        observer.started(generation)
    return generation
