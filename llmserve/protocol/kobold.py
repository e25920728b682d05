"""KoboldAI / KoboldCpp wire models (/api/v1/generate, /api/extra/tokencount, /api/extra/abort).
No I/O here. Unknown keys are ignored; KoboldCpp's own defaults apply to what is omitted."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmserve.protocol.llamacpp import logit_bias_field, stop_strings
from llmserve.protocol.openai import sequence_breakers

# KoboldAI's sampler ids (sampler_order) → llama.cpp sampler names. 1 (top-a) and 3 (tail-free)
# have no llama.cpp sampler and are skipped.
KOBOLD_SAMPLERS: dict[int, str] = {0: "top_k", 2: "top_p", 4: "typ_p", 5: "temperature",
                                   6: "penalties"}
# llama.cpp's full default order: sampler_order reorders the samplers it names among their own
# places in it; the others (dry, top-n-sigma, min-p, xtc) keep theirs.
DEFAULT_ORDER = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                 "temperature")


def kobold_sampler_order(order: list[int]) -> tuple[str, ...]:
    named = [KOBOLD_SAMPLERS[i] for i in order if i in KOBOLD_SAMPLERS]
    named = list(dict.fromkeys(named))
    places = iter(named)
    return tuple(next(places) if name in named else name for name in DEFAULT_ORDER)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerateRequest(_Request):
    """POST /api/v1/generate (the KoboldAI United API as KoboldCpp serves it)."""

    prompt: str
    memory: str = ""
    genkey: str | None = None
    max_length: int = Field(default=100, ge=-1)
    max_context_length: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    typical: float | None = Field(default=None, ge=0.0, le=1.0)
    rep_pen: float | None = Field(default=None, ge=0.0)
    rep_pen_range: int | None = Field(default=None, ge=-1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    nsigma: float | None = None
    mirostat: int | None = Field(default=None, ge=0, le=2)
    mirostat_tau: float | None = Field(default=None, ge=0.0)
    mirostat_eta: float | None = Field(default=None, ge=0.0)
    dynatemp_range: float | None = Field(default=None, ge=0.0)
    dynatemp_exponent: float | None = Field(default=None, ge=0.0)
    dry_multiplier: float | None = Field(default=None, ge=0.0)
    dry_base: float | None = Field(default=None, gt=0.0)
    dry_allowed_length: int | None = Field(default=None, ge=0)
    dry_penalty_last_n: int | None = Field(default=None, ge=-1)
    dry_sequence_breakers: list[str] | None = None
    xtc_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    xtc_probability: float | None = Field(default=None, ge=0.0, le=1.0)
    sampler_order: list[int] | None = None
    sampler_seed: int | None = None
    seed: int | None = None
    stop_sequence: str | list[str] | None = None
    trim_stop: bool = True
    grammar: str | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    bypass_eos: bool = False
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop_sequence")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and not all(isinstance(s, str) for s in v):
            raise ValueError("must be a string or a list of strings")
        return v

    _logit_bias = field_validator("logit_bias", mode="before")(logit_bias_field)

    @field_validator("grammar")
    @classmethod
    def _grammar(cls, v: str | None) -> str | None:
        return v or None

    _breakers = field_validator("dry_sequence_breakers", mode="before")(sequence_breakers)

    @property
    def requested_max_tokens(self) -> int | None:
        return None if self.max_length in (0, -1) else self.max_length

    @property
    def effective_seed(self) -> int | None:
        seed = self.sampler_seed if self.sampler_seed is not None else self.seed
        return None if seed is None or seed < 0 else seed

    def stop_list(self) -> list[str]:
        return stop_strings(self.stop_sequence)


class TokenCountRequest(_Request):
    """Counted exactly as /api/v1/generate tokenises the prompt (the model's special tokens
    included)."""

    prompt: str


class AbortRequest(_Request):
    genkey: str | None = None
