"""Request sampling parameters → llama.cpp's native sampler chain.

``plan_chain`` is pure: it decides which samplers run, in which order, with which arguments, so
tests can assert on it without a model. ``Sampler`` builds that plan with llama_sampler_* calls.
The order follows llama.cpp's common sampler: logit bias, penalties, then the truncation
samplers, temperature, and finally the distribution (or greedy at temperature 0).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llama_cpp

from llmserve.engine.types import SamplingParams

if TYPE_CHECKING:
    from llmserve.engine.model import LoadedModel


@dataclass(frozen=True)
class SamplerStep:
    name: str
    args: tuple[Any, ...] = ()


def plan_chain(params: SamplingParams, *, seed: int) -> list[SamplerStep]:
    steps: list[SamplerStep] = []
    if params.logit_bias:
        steps.append(SamplerStep("logit_bias", (params.logit_bias,)))
    if (
        params.repeat_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    ) and params.repeat_last_n != 0:
        steps.append(
            SamplerStep(
                "penalties",
                (
                    params.repeat_last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
        )
    if params.temperature <= 0.0:
        steps.append(SamplerStep("greedy"))
        return steps
    if params.top_k > 0:
        steps.append(SamplerStep("top_k", (params.top_k,)))
    if params.typical_p < 1.0:
        steps.append(SamplerStep("typical", (params.typical_p, 1)))
    if params.top_p < 1.0:
        steps.append(SamplerStep("top_p", (params.top_p, 1)))
    if params.min_p > 0.0:
        steps.append(SamplerStep("min_p", (params.min_p, 1)))
    steps.append(SamplerStep("temp", (params.temperature,)))
    steps.append(SamplerStep("dist", (seed,)))
    return steps


def resolve_seed(seed: int | None) -> int:
    if seed is None or seed < 0:
        return random.getrandbits(32)
    return seed & 0xFFFFFFFF


class Sampler:
    """One request's sampler chain. Owned by the worker thread; ``free`` it when done."""

    def __init__(self, params: SamplingParams, model: LoadedModel) -> None:
        self.seed = resolve_seed(params.seed)
        self.plan = plan_chain(params, seed=self.seed)
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain: Any = llama_cpp.llama_sampler_chain_init(chain_params)
        self.tracks_history = False
        for step in self.plan:
            llama_cpp.llama_sampler_chain_add(self._chain, self._build(step, model))
            if step.name == "penalties":
                self.tracks_history = True

    @staticmethod
    def _build(step: SamplerStep, model: LoadedModel) -> Any:
        a = step.args
        match step.name:
            case "logit_bias":
                pairs: Sequence[tuple[int, float]] = a[0]
                arr = (llama_cpp.llama_logit_bias * len(pairs))()
                for i, (token, bias) in enumerate(pairs):
                    arr[i].token = token  # type: ignore[assignment]
                    arr[i].bias = bias
                return llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(pairs), arr)
            case "penalties":
                return llama_cpp.llama_sampler_init_penalties(model.n_vocab, *a)
            case "greedy":
                return llama_cpp.llama_sampler_init_greedy()
            case "top_k":
                return llama_cpp.llama_sampler_init_top_k(*a)
            case "typical":
                return llama_cpp.llama_sampler_init_typical(*a)
            case "top_p":
                return llama_cpp.llama_sampler_init_top_p(*a)
            case "min_p":
                return llama_cpp.llama_sampler_init_min_p(*a)
            case "temp":
                return llama_cpp.llama_sampler_init_temp(*a)
            case "dist":
                return llama_cpp.llama_sampler_init_dist(*a)
        raise ValueError(f"unknown sampler {step.name!r}")

    def accept_history(self, tokens: Sequence[int]) -> None:
        """Feed prompt tokens to the samplers that look back (repeat/presence penalties)."""
        if self.tracks_history:
            for token in tokens:
                llama_cpp.llama_sampler_accept(self._chain, token)

    def sample(self, ctx: Any, index: int) -> int:
        """Sample from the logits of batch position ``index`` and accept the token."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))

    def free(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

