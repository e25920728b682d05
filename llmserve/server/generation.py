"""From an admitted request to engine events: prompt preparation, limits, sampling, collection.

Shared by every generating route (OpenAI's and, later, llama.cpp's native ones), so each route
only translates its protocol.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread

from llmserve.engine.types import (
    EngineProtocol,
    Finish,
    GenerationRequest,
    GenerationStream,
    SamplingParams,
    TokenEvent,
)
from llmserve.errors import ContextLengthExceeded, EngineError, InvalidRequest
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


def check_finish(finish: Finish) -> Finish:
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
    sampling = with_model_defaults(sampling, lease.sampling_defaults, explicit_sampling)
    try:
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
    return Generation(lease, stream, prompt)
