"""KoboldAI / KoboldCpp wire models (/api/v1/generate, /api/extra/tokencount, /api/extra/abort).
No I/O here. Unknown keys are ignored; bounds, defaults (``max_length`` 100) and the sampler ids
of ``sampler_order`` are params' rules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from llmserve.params import Family, WireModel


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerateRequest(_Request, WireModel):
    """POST /api/v1/generate (the KoboldAI United API as KoboldCpp serves it)."""

    FAMILY: ClassVar[Family] = "kobold"
    RENAMES: ClassVar[Mapping[str, str]] = {
        "max_length": "n_predict", "typical": "typical_p", "rep_pen": "repeat_penalty",
        "rep_pen_range": "repeat_last_n", "nsigma": "top_n_sigma", "bypass_eos": "ignore_eos",
        "sampler_seed": "seed", "stop_sequence": "stop",
    }

    prompt: str
    memory: str = ""
    genkey: str | None = None
    model: str | None = None
    max_length: int | None = None
    max_context_length: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical: float | None = None
    rep_pen: float | None = None
    rep_pen_range: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    nsigma: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    dynatemp_range: float | None = None
    dynatemp_exponent: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: Any = None
    xtc_threshold: float | None = None
    xtc_probability: float | None = None
    sampler_order: Any = None
    sampler_seed: int | None = None
    seed: int | None = None
    stop_sequence: Any = None
    trim_stop: bool = True
    grammar: str | None = None
    logit_bias: Any = None
    bypass_eos: bool | None = None
    n: int = Field(default=1, ge=1, le=1)


class TokenCountRequest(_Request):
    """Counted exactly as /api/v1/generate tokenises the prompt (the model's special tokens
    included)."""

    prompt: str
    model: str | None = None


class AbortRequest(_Request):
    genkey: str | None = None
