"""llama.cpp's native wire models (llama-server's /completion, /tokenize, /detokenize,
/apply-template). No I/O here.

Field names and defaults are llama-server's. Unknown keys are ignored (SillyTavern forwards its
whole settings object), and the leniencies real clients rely on are accepted: ``n_predict`` and
its aliases at 0 or -1 mean "until the context or the server ceiling", ``stop`` and
``stopping_strings`` as a string or a list, ``seed`` -1 = random, ``grammar`` "" = none,
``logit_bias`` as ``[[id, bias|false], ...]`` (may be empty) or ``{"id": bias}``.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmserve.protocol.openai import ChatMessage, sequence_breakers


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# llama.cpp's sampler names and the alternative spellings common_sampler_types_from_names
# accepts; the canonical name is what SamplingParams.samplers carries.
SAMPLER_NAMES: dict[str, str] = {
    "penalties": "penalties",
    "dry": "dry",
    "top_n_sigma": "top_n_sigma",
    "top_k": "top_k",
    "typ_p": "typ_p",
    "top_p": "top_p",
    "min_p": "min_p",
    "xtc": "xtc",
    "temperature": "temperature",
    "infill": "infill",
    "top-k": "top_k",
    "top-p": "top_p",
    "nucleus": "top_p",
    "typical-p": "typ_p",
    "typical": "typ_p",
    "typical_p": "typ_p",
    "typ-p": "typ_p",
    "typ": "typ_p",
    "min-p": "min_p",
    "temp": "temperature",
    "top-n-sigma": "top_n_sigma",
}
# the one-letter form ("dkypmxt"), as llama-server's --sampling-seq
SAMPLER_CHARS: dict[str, str] = {
    "e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p", "p": "top_p",
    "m": "min_p", "x": "xtc", "t": "temperature", "i": "infill",
}


def sampler_order(value: str | list[str]) -> tuple[str, ...]:
    """Canonical sampler names in order. Unknown names are skipped, as llama-server does."""
    if isinstance(value, str):
        names = [SAMPLER_NAMES.get(value)] if value in SAMPLER_NAMES else [
            SAMPLER_CHARS.get(c) for c in value
        ]
    else:
        names = [SAMPLER_NAMES.get(v.strip().lower()) for v in value]
    return tuple(n for n in names if n)


def _max_tokens(value: int | None) -> int | None:
    """0 and -1 mean "as many as fit" (None); below -1 is an error."""
    if value is None or value in (0, -1):
        return None
    if value < -1:
        raise ValueError("must be a positive number of tokens, or 0 / -1 for no limit")
    return value


def stop_strings(*values: str | list[str] | None) -> list[str]:
    """Every stop string from ``stop`` / ``stopping_strings`` (strings or lists), deduplicated
    in order, empties dropped."""
    out: list[str] = []
    for value in values:
        items = [value] if isinstance(value, str) else (value or [])
        for s in items:
            if s and s not in out:
                out.append(s)
    return out


def _check_stop(v: str | list[str] | None) -> str | list[str] | None:
    if isinstance(v, list) and not all(isinstance(s, str) for s in v):
        raise ValueError("must be a string or a list of strings")
    return v


LogitBiasValue = float | bool
LogitBias = list[list[Any]] | dict[str, LogitBiasValue]


def logit_bias_pairs(value: LogitBias | None) -> tuple[tuple[int, float], ...]:
    """``[[id, bias|false], ...]`` or ``{"id": bias|false}`` → (id, bias) pairs; ``false`` bans
    the token (-inf). Raises ValueError naming the bad entry."""
    if not value:
        return ()
    entries: list[tuple[Any, Any]]
    if isinstance(value, dict):
        entries = list(value.items())
    else:
        entries = []
        for i, item in enumerate(value):
            if not isinstance(item, list) or len(item) != 2:
                raise ValueError(f"entry {i} must be a pair [token_id, bias]")
            entries.append((item[0], item[1]))
    pairs: list[tuple[int, float]] = []
    for key, bias in entries:
        token = _token_id(key, keys_are_text=isinstance(value, dict))
        if bias is False:
            pairs.append((token, -math.inf))
        elif (isinstance(bias, bool) or not isinstance(bias, int | float)
              or not math.isfinite(bias)):
            raise ValueError(f"the bias for token {token} must be a finite number or false")
        else:
            pairs.append((token, float(bias)))
    return tuple(pairs)


def logit_bias_field(v: Any) -> tuple[tuple[int, float], ...]:
    """A pydantic "before" validator for a ``logit_bias`` field in either form."""
    if v is None:
        return ()
    if not isinstance(v, list | dict):
        raise ValueError("must be a list of [token_id, bias] pairs or an object")
    return logit_bias_pairs(v)


def _token_id(key: Any, *, keys_are_text: bool) -> int:
    """JSON object keys are always text, so there a digit string is an id; in the list form
    llama.cpp reads a string as text to tokenise, which we do not support."""
    if isinstance(key, int) and not isinstance(key, bool):
        token = key
    elif keys_are_text and isinstance(key, str) and key.strip().lstrip("-").isdigit():
        token = int(key)
    else:
        raise ValueError(
            f"{key!r} is not a token id; token strings are not supported here, "
            "send ids (POST /tokenize gives them)"
        )
    if token < 0:
        raise ValueError(f"token id {token} is negative")
    return token


class CompletionRequest(_Request):
    """POST /completion (llama-server's native completion)."""

    prompt: str | list[int | str]
    stream: bool = False
    n_predict: int | None = None
    max_tokens: int | None = None
    max_new_tokens: int | None = None
    num_predict: int | None = None
    temperature: float | None = None
    dynatemp_range: float | None = Field(default=None, ge=0.0)
    dynatemp_exponent: float | None = Field(default=None, ge=0.0)
    top_k: int | None = None
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    typical_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_n_sigma: float | None = None
    xtc_probability: float | None = Field(default=None, ge=0.0, le=1.0)
    xtc_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, ge=0.0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    dry_multiplier: float | None = Field(default=None, ge=0.0)
    dry_base: float | None = Field(default=None, gt=0.0)
    dry_allowed_length: int | None = Field(default=None, ge=0)
    dry_penalty_last_n: int | None = Field(default=None, ge=-1)
    dry_sequence_breakers: list[str] | None = None
    mirostat: int | None = Field(default=None, ge=0, le=2)
    mirostat_tau: float | None = Field(default=None, ge=0.0)
    mirostat_eta: float | None = Field(default=None, ge=0.0)
    min_keep: int | None = Field(default=None, ge=0)
    seed: int | None = None
    ignore_eos: bool | None = None
    samplers: tuple[str, ...] | None = None
    stop: str | list[str] | None = None
    stopping_strings: str | list[str] | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    n_probs: int = Field(default=0, ge=0, le=100)
    cache_prompt: bool = True
    return_tokens: bool = False
    n: int = Field(default=1, ge=1, le=16)
    model: str | None = None

    _check_stops = field_validator("stop", "stopping_strings")(_check_stop)

    @field_validator("n_predict", "max_tokens", "max_new_tokens", "num_predict")
    @classmethod
    def _lenient_max_tokens(cls, v: int | None) -> int | None:
        return _max_tokens(v)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[int | str]) -> str | list[int | str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("the prompt is empty")
            if all(isinstance(p, str) for p in v) and len(v) > 1:
                raise ValueError("one prompt per request: a string, or a list of token ids "
                                 "(strings may be mixed in)")
            if any(isinstance(p, int) and p < 0 for p in v):
                raise ValueError("token ids must not be negative")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        return None if v is None or v < 0 else v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        return None if v is None else max(v, 0)  # <= 0 is "off" in llama.cpp

    @field_validator("grammar")
    @classmethod
    def _grammar(cls, v: str | None) -> str | None:
        return v or None

    _breakers = field_validator("dry_sequence_breakers", mode="before")(sequence_breakers)

    @field_validator("samplers", mode="before")
    @classmethod
    def _samplers(cls, v: Any) -> Any:
        if v is None:
            return None
        if not isinstance(v, str | list) or (
            isinstance(v, list) and not all(isinstance(s, str) for s in v)
        ):
            raise ValueError("must be a list of sampler names")
        return sampler_order(v)

    _logit_bias = field_validator("logit_bias", mode="before")(logit_bias_field)

    @model_validator(mode="after")
    def _one_grammar(self) -> CompletionRequest:
        if self.grammar and self.json_schema is not None:
            raise ValueError("send either grammar or json_schema, not both")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        for value in (self.n_predict, self.max_tokens, self.max_new_tokens, self.num_predict):
            if value is not None:
                return value
        return None

    def stop_list(self) -> list[str]:
        return stop_strings(self.stop, self.stopping_strings)


class TokenizeRequest(_Request):
    """POST /tokenize. ``add_special`` defaults to true (llama-server: false) so that the count
    is exactly what /completion evaluates for the same text."""

    content: str
    add_special: bool = True
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Request):
    tokens: list[int]


class ApplyTemplateRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
