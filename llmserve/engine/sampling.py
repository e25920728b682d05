"""Request sampling parameters → llama.cpp's native sampler chain.

``plan_chain`` is pure: it decides which samplers run, in which order, with which arguments, so
tests can assert on it without a model. ``engine/sampler.py``'s ``Sampler`` builds that plan with
llama_sampler_* calls; this module imports no llama_cpp at import time.

The plan follows llama.cpp's ``common_sampler_init`` (common/sampling.cpp) step for step:

- logit bias first (the request's biases, plus -inf on every end-of-generation token when
  ``ignore_eos`` is set, as llama-server does);
- mirostat 0: the ``samplers`` order (default: penalties, dry, top_n_sigma, top_k, typ_p, top_p,
  min_p, xtc, temperature), then ``dist``. Temperature is ``temp_ext`` (dynamic temperature).
  At temperature <= 0 (no dynatemp) llama.cpp's temperature keeps only the most likely token
  and ``dist`` takes it; we plan the same pick directly: ``greedy``, without the samplers that
  cannot change it (top_k, top_p, min_p, top_n_sigma, and anything after temperature);
- mirostat 1/2: llama.cpp replaces the whole list (penalties and DRY included) with plain
  temperature + the mirostat sampler; so do we.

A sampler whose values make it a no-op (top_k 0, top_p 1, repeat_penalty 1, ...) is left out of
the plan; llama.cpp runs it and it changes nothing, so the result is the same.

The grammar is not part of the chain. Like ``common_sampler`` we keep it apart, sample with the
chain, check the chosen token against the grammar and, only if it is rejected, sample again with
the grammar applied first (checking 49k candidates every token is much slower). Keeping it apart
also keeps prompt tokens out of it: ``accept_history`` feeds the prompt to the chain's samplers
that look back (penalties, DRY), never to the grammar, which must see generated tokens only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmserve.engine.types import SamplingParams
from llmserve.errors import InvalidRequest

# llama.cpp's default order (common_params_sampling::samplers). SamplingParams.samplers holds
# these canonical names: params.py reads every client spelling into them.
DEFAULT_ORDER = (
    "penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature",
)

MIROSTAT_M = 100  # llama.cpp's fixed m for mirostat 1

# Truncation samplers that always keep the most likely token: before a greedy pick they change
# nothing. (typical_p and XTC can drop it, so they stay.)
_KEEP_THE_MOST_LIKELY = frozenset({"top_k", "top_p", "min_p", "top_n_sigma"})


@dataclass(frozen=True)
class SamplerStep:
    name: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ChainPlan:
    steps: tuple[SamplerStep, ...]
    grammar: str | None = None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def step(self, name: str) -> SamplerStep:
        return next(s for s in self.steps if s.name == name)

    @property
    def history_window(self) -> int:
        """How many trailing prompt tokens the look-back samplers need (0: none look back)."""
        window = 0
        for s in self.steps:
            if s.name == "penalties":
                window = max(window, s.args[0])
            elif s.name == "dry":
                window = max(window, s.args[3])
        return window


@dataclass(frozen=True)
class VocabFacts:
    """What planning needs to know about the model."""

    n_vocab: int
    n_ctx: int
    eog_tokens: tuple[int, ...] = ()


def sampler_order(names: Sequence[str]) -> tuple[str, ...]:
    """The canonical names (params.sampler_order made them so); anything else is a 400 naming
    ``samplers``."""
    unknown = [n for n in names if n not in DEFAULT_ORDER]
    if unknown:
        raise InvalidRequest(
            f"invalid 'samplers': unknown sampler {unknown[0]!r}; known: "
            + ", ".join(DEFAULT_ORDER), param="samplers",
        )
    return tuple(names)


def compile_json_schema(schema: dict[str, Any]) -> str:
    """A JSON schema → GBNF. An empty schema means any JSON object (llama-server's rule)."""
    # llama-cpp-python's converter is plain Python, but it lives in the llama_cpp package, whose
    # import loads llama.cpp: imported here, so that only a JSON schema needs llama_cpp.
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if not schema:
        schema = {"type": "object"}
    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter asserts, and raises KeyError/TypeError on odd input
        detail = str(exc) or type(exc).__name__
        raise InvalidRequest(
            f"invalid 'json_schema': cannot convert it to a grammar: {detail}", param="json_schema"
        ) from None


def plan_chain(
    params: SamplingParams, *, vocab: VocabFacts, seed: int | None = None
) -> ChainPlan:
    """The sampler chain for ``params``. ``seed`` overrides ``params.seed`` (whose absence or
    a negative value means a random one). Raises InvalidRequest for what only the model can
    judge (token ids outside the vocabulary, unknown sampler names, a bad JSON schema)."""
    if seed is None:
        seed = resolve_seed(params.seed)
    steps: list[SamplerStep] = []
    bias = _logit_bias(params, vocab)
    if bias:
        steps.append(SamplerStep("logit_bias", (bias,)))
    if params.mirostat == 1:
        steps.append(SamplerStep("temp", (params.temperature,)))
        steps.append(SamplerStep(
            "mirostat",
            (vocab.n_vocab, seed, params.mirostat_tau, params.mirostat_eta, MIROSTAT_M),
        ))
    elif params.mirostat == 2:
        steps.append(SamplerStep("temp", (params.temperature,)))
        steps.append(SamplerStep("mirostat_v2", (seed, params.mirostat_tau, params.mirostat_eta)))
    elif params.mirostat == 0:
        order = sampler_order(params.samplers) if params.samplers else DEFAULT_ORDER
        greedy = "temperature" in order and params.temperature <= 0 and params.dynatemp_range <= 0
        if greedy:
            # After temperature 0 one candidate is left: what follows it cannot change the pick.
            order = order[: order.index("temperature")]
        for kind in order:
            if greedy and kind in _KEEP_THE_MOST_LIKELY:
                continue
            step = _ordered_step(kind, params, seed, vocab)
            if step is not None:
                steps.append(step)
        steps.append(SamplerStep("greedy") if greedy else SamplerStep("dist", (seed,)))
    else:
        raise InvalidRequest("invalid 'mirostat': expected 0, 1 or 2", param="mirostat")
    return ChainPlan(tuple(steps), _grammar(params))


def _ordered_step(
    kind: str, p: SamplingParams, seed: int, vocab: VocabFacts
) -> SamplerStep | None:
    keep = max(p.min_keep, 0)
    match kind:
        case "penalties":
            last_n = _window(p.repeat_last_n, vocab)
            neutral = (p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0
                       and p.presence_penalty == 0.0)
            if last_n == 0 or neutral:
                return None
            return SamplerStep("penalties", (last_n, p.repeat_penalty, p.frequency_penalty,
                                             p.presence_penalty))
        case "dry":
            last_n = _window(p.dry_penalty_last_n, vocab)
            if p.dry_multiplier == 0.0 or last_n == 0 or p.dry_base < 1.0:
                return None
            return SamplerStep("dry", (p.dry_multiplier, p.dry_base, p.dry_allowed_length, last_n,
                                       tuple(p.dry_sequence_breakers)))
        case "top_n_sigma":
            return SamplerStep("top_n_sigma", (p.top_n_sigma,)) if p.top_n_sigma > 0 else None
        case "top_k":
            return SamplerStep("top_k", (min(p.top_k, vocab.n_vocab),)) if p.top_k > 0 else None
        case "typ_p":
            return SamplerStep("typical", (p.typical_p, keep)) if p.typical_p < 1.0 else None
        case "top_p":
            return SamplerStep("top_p", (p.top_p, keep)) if p.top_p < 1.0 else None
        case "min_p":
            return SamplerStep("min_p", (p.min_p, keep)) if p.min_p > 0.0 else None
        case "xtc":
            # llama.cpp: probability 0 or a threshold above 0.5 disables XTC
            if p.xtc_probability <= 0.0 or p.xtc_threshold > 0.5:
                return None
            return SamplerStep("xtc", (p.xtc_probability, p.xtc_threshold, keep, seed))
        case "temperature":
            return SamplerStep("temp_ext", (p.temperature, p.dynatemp_range,
                                            p.dynatemp_exponent))
    raise AssertionError(f"unplanned sampler kind {kind!r}")


def _window(last_n: int, vocab: VocabFacts) -> int:
    """-1 means the whole context (llama-server's convention for repeat/dry_penalty_last_n).
    A longer window cannot see more than the context, and llama.cpp allocates it up front."""
    return vocab.n_ctx if last_n < 0 else min(last_n, vocab.n_ctx)


def _logit_bias(params: SamplingParams, vocab: VocabFacts) -> tuple[tuple[int, float], ...]:
    bad = [t for t, _ in params.logit_bias if not 0 <= t < vocab.n_vocab]
    if bad:
        raise InvalidRequest(
            f"invalid 'logit_bias': token ids must be in 0..{vocab.n_vocab - 1}, got {bad[:5]}",
            param="logit_bias",
        )
    bias = list(params.logit_bias)
    if params.ignore_eos:
        bias += [(t, -math.inf) for t in vocab.eog_tokens]
    return tuple(bias)


def _grammar(params: SamplingParams) -> str | None:
    if params.grammar:
        return params.grammar
    if params.json_schema is not None:
        return compile_json_schema(params.json_schema)
    return None


def resolve_seed(seed: int | None) -> int:
    if seed is None or seed < 0:
        return random.getrandbits(32)
    return seed & 0xFFFFFFFF


def compile_params(params: SamplingParams, vocab: VocabFacts) -> SamplingParams:
    """The model-free part of ``prepare``: plan the chain (which validates) and compile
    ``json_schema`` into ``grammar``. Raises InvalidRequest."""
    plan = plan_chain(params, seed=0, vocab=vocab)
    if plan.grammar is None or plan.grammar == params.grammar:
        return params
    return dataclasses.replace(params, grammar=plan.grammar, json_schema=None)
