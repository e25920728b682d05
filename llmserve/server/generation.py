"""From an admitted request to engine events: prompt preparation, limits, sampling, collection.

Shared by every generating route (OpenAI's and, later, llama.cpp's native ones), so each route
only translates its protocol.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable, Mapping
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
from llmserve.registry import Lease, ModelHost


@dataclass(frozen=True)
class Limits:
    """Server-side ceiling on generated tokens (``--max-tokens-limit``); None = context only."""

    max_tokens_limit: int | None = None


async def prepare(
    engine: EngineProtocol, build: Callable[[EngineProtocol], list[int]],
    sampling: SamplingParams,
) -> tuple[list[int], SamplingParams]:
    """Template + tokenise, and check the sampling parameters against the model (grammar,
    token ids), off the event loop."""

    def work() -> tuple[list[int], SamplingParams]:
        return build(engine), engine.prepare_sampling(sampling)

    return await anyio.to_thread.run_sync(work)


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


LogitBias = dict[str, float | bool] | list[Any]


def logit_bias_pairs(bias: LogitBias | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` or llama.cpp's ``[[token id, bias], ...]`` → pairs.
    A bias of ``false`` bans the token (-inf), as in llama.cpp. Token ids are checked against
    the vocabulary later, by the engine."""
    if not bias:
        return ()
    items = bias.items() if isinstance(bias, dict) else bias
    pairs: list[tuple[int, float]] = []
    for item in items:
        if isinstance(bias, list) and (not isinstance(item, list) or len(item) != 2):
            raise InvalidRequest(
                f"invalid 'logit_bias': expected [token id, bias] pairs, got {item!r}",
                param="logit_bias",
            )
        key, value = item
        pairs.append((_token_id(key, keys_are_text=isinstance(bias, dict)), _bias_value(value)))
    return tuple(pairs)


def _token_id(key: object, *, keys_are_text: bool) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if keys_are_text and isinstance(key, str):  # JSON object keys are strings
        with contextlib.suppress(ValueError):
            return int(key)
    raise InvalidRequest(
        f"invalid 'logit_bias': keys must be token ids, got {key!r}", param="logit_bias"
    )


def _bias_value(value: object) -> float:
    if value is False:
        return -math.inf
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise InvalidRequest(
        f"invalid 'logit_bias': a bias must be a finite number or false, got {value!r}",
        param="logit_bias",
    )


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


async def start(
    host: ModelHost,
    build_prompt: Callable[[EngineProtocol], list[int]],
    *,
    requested_max_tokens: int | None,
    sampling: SamplingParams,
    stop: list[str],
    limits: Limits,
    param_names: Mapping[str, str] | None = None,
) -> Generation:
    """Admit, prepare and submit. Admission comes first (503 before any templating); on any
    later error the admission place is given back before raising. ``param_names`` renames the
    ``param`` of a sampling error to the route's own field (e.g. json_schema → response_format).
    """
    lease = host.lease()
    engine = lease.engine
    try:
        try:
            prompt, sampling = await prepare(engine, build_prompt, sampling)
        except InvalidRequest as exc:
            if param_names and exc.param is not None and exc.param in param_names:
                wire = param_names[exc.param]
                exc.message = exc.message.replace(f"'{exc.param}'", f"'{wire}'")
                exc.param = wire
                exc.args = (exc.message,)
            raise
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
