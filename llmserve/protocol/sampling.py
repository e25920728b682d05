"""The generation fields under llama.cpp's own names, which both llama-server's /completion and
our OpenAI routes accept (SillyTavern sends them to either). Declarations only: params.py checks
and converts them."""

from __future__ import annotations

from typing import Any

from llmserve.params import LoraScale, WireModel


class LlamaCppSampling(WireModel):
    model: str | None = None
    temperature: float | None = None
    dynatemp_range: float | None = None
    dynatemp_exponent: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    top_n_sigma: float | None = None
    xtc_probability: float | None = None
    xtc_threshold: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    # a JSON array of strings, or that array as a JSON string (text-generation-webui's form)
    dry_sequence_breakers: Any = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    min_keep: int | None = None
    seed: int | None = None
    ignore_eos: bool | None = None
    # llama.cpp names, or its one-letter string form ("edskypmxt")
    samplers: Any = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    # OpenAI's {"token id": bias} or llama.cpp's [[token id, bias | false], ...]
    logit_bias: Any = None
    stop: Any = None
    # llama-server's per-request LoRA scales
    lora: list[LoraScale] | None = None
