"""The one normaliser: a request's generation parameters, whichever route family they came
through, checked and resolved into what the engine path needs.

Each wire model in ``protocol/`` (a ``WireModel``) only renames its fields into this module's
vocabulary — llama.cpp's /completion names (SamplingParams' fields, ``n_predict``, ``stop``,
``n_probs``) plus ``do_sample``, ``n_ctx`` (a context window the client asks for, at most the
loaded one), ``lora`` (the request's adapter scales) and OpenAI's ``logprobs``, ``top_logprobs``
and ``n`` — and reports what the client set (``Wire``). The rest is decided here, once:

- bounds: one table (``BOUNDS``) for every number; NaN and ±inf are refused everywhere (Python's
  json reads ``NaN`` and ``Infinity`` tokens, and 1e999 becomes inf);
- precedence (``Params.sampling``): the client's value → the model's ``[sampling]`` table →
  ``[server.sampling]`` (config merges those two into ``ModelSpec.sampling``) → the route
  family's documented defaults (``FAMILY_DEFAULTS``) → SamplingParams' built-in defaults;
- seed (absent or negative = random), ``stop`` (a string or a list of strings, deduplicated,
  empties dropped), ``n_predict`` (0 and -1 = until the context; below -1 refused), sampler names
  (one table, ``SAMPLER_NAMES``), ``logit_bias`` (one parser), ``dry_sequence_breakers``, and a
  grammar with a JSON schema (refused);
- OpenAI fields whose semantics llmserve does not implement (``OPENAI_UNSUPPORTED``): refused
  with ``unsupported_parameter`` unless their value means "off".

A bad value raises InvalidRequest whose ``param`` is the field as the client spelled it; the
route family's error shape renders it (server/errors.py). Imports nothing from llama_cpp.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmserve.engine.types import SamplingParams
from llmserve.errors import InvalidRequest, UnsupportedParameter

Family = Literal["openai", "llamacpp", "kobold", "native", "ollama", "responses"]

SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
# besides SamplingParams': KoboldAI's sampler ids, the seed API's greedy switch, the context
# window a client asks for (Ollama's num_ctx), the request's LoRA scales, and OpenAI's logprobs
# and choices
VOCABULARY = SAMPLING_FIELDS | {"n_predict", "stop", "n_probs", "sampler_order", "do_sample",
                                "n_ctx", "lora", "logprobs", "top_logprobs", "n"}

INT32_MAX = 2**31 - 1  # llama.cpp's int32_t parameters


@dataclass(frozen=True)
class Bound:
    """An allowed range; ``integer`` fields must be whole numbers."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"between {_num(self.low)} and {_num(self.high)}"
        if self.low is not None:
            return f"greater than {_num(self.low)}" if self.low_open else (
                f"at least {_num(self.low)}")
        return "a finite number"

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _int(low: float | None = None, high: float | None = INT32_MAX) -> Bound:
    return Bound(low, high, integer=True)


# Where the four route families disagreed, the strictest bound that real clients still pass
# (SillyTavern sends top_k 0, repeat_last_n 0, seed -1, n_predict -1, dry_base 1.75).
BOUNDS: dict[str, Bound] = {
    "temperature": Bound(0.0),
    "dynatemp_range": Bound(0.0),
    "dynatemp_exponent": Bound(0.0),
    "top_k": _int(-1),  # 0 and -1 (vLLM's spelling) mean off
    "top_p": Bound(0.0, 1.0),
    "min_p": Bound(0.0, 1.0),
    "typical_p": Bound(0.0, 1.0),
    "top_n_sigma": Bound(),  # <= 0 means off
    "xtc_probability": Bound(0.0, 1.0),
    "xtc_threshold": Bound(0.0, 1.0),
    "repeat_penalty": Bound(0.0, low_open=True),  # llama.cpp divides logits by it
    "repeat_last_n": _int(-1),  # -1 = the whole context
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
    "dry_multiplier": Bound(0.0),
    "dry_base": Bound(1.0),
    "dry_allowed_length": _int(0),
    "dry_penalty_last_n": _int(-1),
    "mirostat": _int(0, 2),
    "mirostat_tau": Bound(0.0),
    "mirostat_eta": Bound(0.0),
    "min_keep": _int(0),
    "seed": _int(None, 2**64 - 1),  # negative = random
    "n_predict": _int(-1),  # 0 and -1 = until the context
    "n_probs": _int(0, 100),
    "n_ctx": _int(1),
    "top_logprobs": _int(0, 20),  # OpenAI's chat bound
    "logprobs": _int(0, 20),  # /v1/completions' count (OpenAI's own stops at 5)
    "n": _int(1),  # and at most the model's --parallel: checked when the engine is known
}

# The defaults each route family documents, below the model's configured ones.
FAMILY_DEFAULTS: dict[Family, Mapping[str, Any]] = {
    "openai": {},
    "responses": {},
    "llamacpp": {},
    "kobold": {"n_predict": 100},  # KoboldCpp's max_length
    # the seed API's document; min-p, on by default in llama.cpp, is not one of its knobs
    "native": {"temperature": 0.7, "top_p": 0.9, "top_k": 80, "repeat_penalty": 1.15,
               "min_p": 0.0},
    # Ollama's defaults are each model's Modelfile PARAMETERs; ours are the model's [sampling]
    # table, so a request means the same on /api/chat as on /v1/chat/completions.
    "ollama": {},
}
# The native families cap a request for more tokens than fit (llama-server and KoboldCpp do);
# OpenAI's refuse it with context_length_exceeded.
CAP_TO_CONTEXT: dict[Family, bool] = {
    "openai": False, "responses": False, "llamacpp": True, "kobold": True, "native": True,
    "ollama": True,
}

# llama.cpp's default sampler order (common_params_sampling::samplers), canonical names.
DEFAULT_ORDER = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                 "temperature")
_CANONICAL = {**{name: name for name in DEFAULT_ORDER}, "typical_p": "typ_p"}
# Every spelling clients send (common_sampler_types_from_names: canonical, kebab-case, no
# separator, a few aliases; "typical_p"/"typical" as SillyTavern and KoboldCpp name the
# parameter; the one-letter string form "edskypmxt") → the canonical name.
SAMPLER_NAMES: dict[str, str] = {
    **{name.replace("_", "-"): canon for name, canon in _CANONICAL.items()},
    **{name.replace("_", ""): canon for name, canon in _CANONICAL.items()},
    **_CANONICAL,
    "nucleus": "top_p", "temp": "temperature", "typ": "typ_p", "typical": "typ_p",
}
SAMPLER_LETTERS: dict[str, str] = {
    "e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p", "p": "top_p",
    "m": "min_p", "x": "xtc", "t": "temperature",
}
# KoboldAI's sampler ids (sampler_order). 1 (top-a) and 3 (tail-free) have no llama.cpp sampler.
KOBOLD_SAMPLERS: dict[int, str] = {0: "top_k", 2: "top_p", 4: "typ_p", 5: "temperature",
                                   6: "penalties"}

# OpenAI fields whose semantics llmserve does not implement yet: a value that asks for them is
# refused rather than silently ignored. Remove a name here when its feature lands.
OPENAI_UNSUPPORTED = (
    "functions", "function_call", "best_of", "audio", "modalities", "prediction",
    "web_search_options", "reasoning_effort",
)
# Chat-only fields (server/chat_plan.py): refused on /v1/completions.
OPENAI_CHAT_ONLY = ("tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
                    "reasoning_format")


class LoraScale(BaseModel):
    """One entry of a request's ``lora`` list (llama-server's): an adapter id from GET
    /lora-adapters and its scale for this request; adapters not listed get 0."""

    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=0)
    scale: float = Field(allow_inf_nan=False)


@dataclass(frozen=True)
class Wire:
    """A request's generation parameters in the vocabulary: only what the client set (null is
    unset), and how the client spelled each field (for errors)."""

    family: Family
    values: Mapping[str, Any]
    names: Mapping[str, str] = field(default_factory=dict)
    # every spelling of ``stop`` the client sent, as (wire name, value)
    stops: Sequence[tuple[str, Any]] = ()
    # OPENAI_UNSUPPORTED fields the client sent (not null)
    unsupported: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    # seconds idle before the model unloads (None = forever); "model" keeps the model's own
    keep_alive: float | Literal["model"] | None = "model"


class WireModel(BaseModel):
    """A wire request model that ``params`` reads. Declare the generation fields under their
    wire names; ``RENAMES`` maps a wire name to the vocabulary's where they differ. When several
    spellings of one field are set, the first declared wins (``stop``: all are merged)."""

    FAMILY: ClassVar[Family]
    RENAMES: ClassVar[Mapping[str, str]] = {}
    UNSUPPORTED: ClassVar[Sequence[str]] = ()
    # the field that names the model
    MODEL_FIELD: ClassVar[str] = "model"

    def keep_alive_seconds(self) -> float | Literal["model"] | None:
        """How long the model stays loaded once idle (None = forever); "model": its own."""
        return "model"

    def wire(self) -> Wire:
        values: dict[str, Any] = {}
        names: dict[str, str] = {}
        stops: list[tuple[str, Any]] = []
        for name in type(self).model_fields:
            key = self.RENAMES.get(name, name)
            value = getattr(self, name)
            if key not in VOCABULARY or value is None:
                continue
            if key == "stop":
                stops.append((name, value))
            elif key not in values:
                values[key] = value
                names[key] = name
        unsupported = {n: getattr(self, n) for n in self.UNSUPPORTED
                       if getattr(self, n, None) is not None}
        model = getattr(self, self.MODEL_FIELD, None)
        return Wire(self.FAMILY, values, names, tuple(stops), unsupported, model,
                    self.keep_alive_seconds())


@dataclass(frozen=True)
class Params:
    """One request's generation parameters, checked: what ``server.generation.start`` takes.

    ``client`` holds only the sampling values the client set (SamplingParams names, already in
    SamplingParams' types); ``sampling`` adds the defaults under them."""

    family: Family
    client: Mapping[str, Any]
    max_tokens: int | None = None  # None: until the context (or the server's ceiling)
    stop: tuple[str, ...] = ()
    n_probs: int = 0
    model: str | None = None
    keep_alive: float | Literal["model"] | None = "model"
    names: Mapping[str, str] = field(default_factory=dict)
    # the context window the client asked for (at most the model's); None: the model's
    n_ctx: int | None = None
    # the request's LoRA scales as (adapter id, scale); None: the model's global scales
    lora: tuple[tuple[int, float], ...] | None = None
    # OpenAI logprobs: how many alternatives to show per token (``n_probs`` covers it); None:
    # not asked for
    logprobs: int | None = None
    # how many choices of the prompt to generate (OpenAI ``n``)
    n: int = 1

    @property
    def cap_to_context(self) -> bool:
        return CAP_TO_CONTEXT[self.family]

    def sampling(self, model_defaults: Mapping[str, Any]) -> SamplingParams:
        """The client's values over ``model_defaults`` (the model's [sampling] table over
        [server.sampling]) over the route family's defaults over SamplingParams'."""
        family = {k: v for k, v in FAMILY_DEFAULTS[self.family].items() if k in SAMPLING_FIELDS}
        merged = {**family, **model_defaults, **self.client}
        # A grammar and a JSON schema are one constraint: the client's replaces a default's.
        for own, other in (("grammar", "json_schema"), ("json_schema", "grammar")):
            if own in self.client and other not in self.client:
                merged.pop(other, None)
        return SamplingParams(**merged)

    def with_seed_offset(self, offset: int) -> Params:
        """Swipes from one seed must still differ."""
        seed = self.client.get("seed")
        if seed is None or not offset:
            return self
        return dataclasses.replace(self, client={**self.client, "seed": seed + offset})

    def wire_name(self, param: str) -> str:
        """``param`` (a vocabulary name) as the client spelled it."""
        return self.names.get(param, param)


def normalise(wire: Wire) -> Params:
    """Check every value ``wire`` carries and turn it into Params. Raises InvalidRequest (or
    UnsupportedParameter) naming the field as the client sent it."""
    refuse_unsupported(wire.unsupported)
    values = dict(wire.values)
    names = dict(wire.names)
    if wire.stops:
        names["stop"] = wire.stops[0][0]
    client = checked_sampling(
        {k: v for k, v in values.items() if k in SAMPLING_FIELDS}, names
    )
    if "sampler_order" in values and "samplers" not in client:
        client["samplers"] = kobold_sampler_order(values["sampler_order"],
                                                  names.get("sampler_order", "sampler_order"))
    if values.get("do_sample") is False:
        client["temperature"] = 0.0  # the seed API's greedy switch
    n_predict = values.get("n_predict", FAMILY_DEFAULTS[wire.family].get("n_predict"))
    if n_predict is not None:
        n_predict = _number("n_predict", n_predict, names)
    n_probs = _number("n_probs", values["n_probs"], names) if "n_probs" in values else 0
    n_ctx = _number("n_ctx", values["n_ctx"], names) if "n_ctx" in values else None
    logprobs = openai_logprobs(values, names)
    if logprobs is not None:
        n_probs = max(n_probs, logprobs, 1)  # 1: the sampled token's own log p is computed too
    return Params(
        family=wire.family,
        client=client,
        max_tokens=None if n_predict in (None, 0, -1) else n_predict,
        stop=stop_strings(wire.stops),
        n_probs=n_probs,
        model=wire.model or None,
        keep_alive=wire.keep_alive,
        names=names,
        n_ctx=n_ctx,
        lora=None if "lora" not in values else tuple((e.id, e.scale) for e in values["lora"]),
        logprobs=logprobs,
        n=_number("n", values["n"], names) if "n" in values else 1,
    )


def openai_logprobs(values: Mapping[str, Any], names: Mapping[str, str]) -> int | None:
    """How many alternatives per token OpenAI's logprobs ask for, None when not asked: chat's
    ``logprobs: true`` with ``top_logprobs`` (0-20, default 0), or /v1/completions'
    ``logprobs: N`` (a number: the sampled token plus N alternatives)."""
    asked = values.get("logprobs")
    top = values.get("top_logprobs")
    top = 0 if top is None else _number("top_logprobs", top, names)
    if asked is None or asked is False:
        if top:
            raise _invalid("top_logprobs", "needs logprobs: true", names)
        return None
    if asked is True:
        return int(top)
    return int(_number("logprobs", asked, names))


def checked_sampling(values: Mapping[str, Any], names: Mapping[str, str] | None = None
                     ) -> dict[str, Any]:
    """SamplingParams values (any subset) checked and in SamplingParams' types; the config's
    [sampling] tables go through here too. Raises InvalidRequest."""
    names = names or {}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in BOUNDS:
            out[key] = _number(key, value, names)
        elif key == "samplers":
            out[key] = sampler_order(value, names.get(key, key))
        elif key == "logit_bias":
            out[key] = logit_bias_pairs(value, names.get(key, key))
        elif key == "dry_sequence_breakers":
            out[key] = sequence_breakers(value, names.get(key, key))
        elif key == "grammar":
            if not isinstance(value, str):
                raise _invalid(key, "must be a string", names)
            if value:  # "" = none (SillyTavern sends it)
                out[key] = value
        elif key == "grammar_triggers":
            if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
                raise _invalid(key, "must be a list of regular expressions", names)
            out[key] = tuple(value)
        elif key == "json_schema":
            if not isinstance(value, dict):
                raise _invalid(key, "must be a JSON object", names)
            out[key] = value
        elif key == "ignore_eos":
            if not isinstance(value, bool):
                raise _invalid(key, "must be true or false", names)
            out[key] = value
        else:  # pragma: no cover - every SamplingParams field is handled above
            raise AssertionError(f"no rule for {key!r}")
    if out.get("seed") is not None and out["seed"] < 0:
        out["seed"] = None  # random
    if out.get("top_k", 0) < 0:
        out["top_k"] = 0  # off
    if out.get("grammar") and "json_schema" in out:
        raise _invalid("grammar", "give either a grammar or a JSON schema (json_schema or "
                       "response_format), not both", names)
    return out


def _invalid(key: str, message: str, names: Mapping[str, str]) -> InvalidRequest:
    wire = names.get(key, key)
    return InvalidRequest(f"invalid '{wire}': {message}", param=wire)


def _number(key: str, value: Any, names: Mapping[str, str]) -> Any:
    bound = BOUNDS[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(key, "must be a number", names)
    if not math.isfinite(value):
        raise _invalid(key, f"must be a finite number, got {value}", names)
    if bound.integer:
        if not float(value).is_integer():
            raise _invalid(key, "must be a whole number", names)
        value = int(value)
    else:
        value = float(value)
    if not bound.holds(value):
        raise _invalid(key, f"must be {bound.describe()}, got {_num(value)}", names)
    return value


def sampler_order(value: Any, wire: str = "samplers") -> tuple[str, ...]:
    """Canonical sampler names in order, from a list of names, one name, or the one-letter
    string form ("edkypmxt"). Unknown names are refused."""
    if isinstance(value, str):
        key = value.strip().lower()
        if key in SAMPLER_NAMES:
            return (SAMPLER_NAMES[key],)
        if key and all(c in SAMPLER_LETTERS for c in key):
            return tuple(SAMPLER_LETTERS[c] for c in key)
        items: list[Any] = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise InvalidRequest(f"invalid '{wire}': must be a list of sampler names", param=wire)
    out: list[str] = []
    for item in items:
        name = SAMPLER_NAMES.get(item.strip().lower()) if isinstance(item, str) else None
        if name is None:
            raise InvalidRequest(
                f"invalid '{wire}': unknown sampler {item!r}; known: {', '.join(DEFAULT_ORDER)}",
                param=wire,
            )
        out.append(name)
    return tuple(out)


def kobold_sampler_order(value: Any, wire: str = "sampler_order") -> tuple[str, ...]:
    """KoboldAI's ``sampler_order`` ids → canonical names: the ids reorder the samplers they
    name among their own places in llama.cpp's default order; the rest keep theirs."""
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise InvalidRequest(f"invalid '{wire}': must be a list of sampler ids", param=wire)
    named = list(dict.fromkeys(KOBOLD_SAMPLERS[i] for i in value if i in KOBOLD_SAMPLERS))
    places = iter(named)
    return tuple(next(places) if name in named else name for name in DEFAULT_ORDER)


def sequence_breakers(value: Any, wire: str = "dry_sequence_breakers") -> tuple[str, ...]:
    """DRY sequence breakers. SillyTavern keeps the setting as JSON text and some builds send it
    unparsed: a JSON array in a string is read as the list, any other string is one breaker
    (llama-server's reading)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        value = parsed if isinstance(parsed, list) else [value]
    if not isinstance(value, list | tuple) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest(f"invalid '{wire}': must be a list of strings", param=wire)
    return tuple(value)


def stop_strings(stops: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
    """Every stop string from each (wire name, value) — a string or a list of strings —
    deduplicated in order, empties dropped."""
    out: list[str] = []
    for wire, value in stops:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise InvalidRequest(f"invalid '{wire}': must be a string or a list of strings",
                                 param=wire)
        out += [s for s in items if s and s not in out]
    return tuple(out)


def logit_bias_pairs(value: Any, wire: str = "logit_bias") -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` or llama.cpp's ``[[token id, bias|false], ...]`` (may be
    empty) → (id, bias) pairs; ``false`` bans the token (-inf). Token ids are checked against
    the vocabulary later, by the engine."""

    def bad(message: str) -> InvalidRequest:
        return InvalidRequest(f"invalid '{wire}': {message}", param=wire)

    if isinstance(value, tuple):  # already pairs (a config default)
        value = [list(p) for p in value]
    if isinstance(value, dict):
        entries = list(value.items())
    elif isinstance(value, list):
        entries = []
        for i, item in enumerate(value):
            if not isinstance(item, list | tuple) or len(item) != 2:
                raise bad(f"entry {i} must be a pair [token_id, bias]")
            entries.append((item[0], item[1]))
    else:
        raise bad("must be a list of [token_id, bias] pairs or an object")
    pairs: list[tuple[int, float]] = []
    for key, bias in entries:
        token = _token_id(key, keys_are_text=isinstance(value, dict), bad=bad)
        if bias is False:
            pairs.append((token, -math.inf))
        elif (isinstance(bias, bool) or not isinstance(bias, int | float)
              or not math.isfinite(bias)):
            raise bad(f"the bias for token {token} must be a finite number or false")
        else:
            pairs.append((token, float(bias)))
    return tuple(pairs)


def _token_id(key: Any, *, keys_are_text: bool, bad: Any) -> int:
    """JSON object keys are always text, so there a digit string is an id; in the list form
    llama.cpp reads a string as text to tokenise, which we do not support."""
    if isinstance(key, int) and not isinstance(key, bool):
        token = key
    elif keys_are_text and isinstance(key, str) and key.strip().lstrip("-").isdigit():
        token = int(key)
    else:
        raise bad(f"{key!r} is not a token id; token strings are not supported here, send "
                  "ids (POST /tokenize gives them)")
    if token < 0:
        raise bad(f"token id {token} is negative")
    return token


def refuse_unsupported(sent: Mapping[str, Any]) -> None:
    """An OpenAI field we do not implement, with a value that asks for it → 400
    ``unsupported_parameter``. Values that mean "off" pass: SillyTavern and the openai SDK
    send some (``best_of: 1``, ``tools: []``, ``tool_choice: "none"``; "auto" without
    tools)."""
    for name, value in sent.items():
        if name == "best_of" and isinstance(value, int) and not isinstance(value, bool) \
                and value < 1:
            raise InvalidRequest(f"invalid '{name}': must be at least 1", param=name)
        if not _is_off(name, value, sent):
            raise UnsupportedParameter(
                f"'{name}' is not supported by this server yet (got {_short(value)}); "
                "leave it out", param=name,
            )


def _is_off(name: str, value: Any, sent: Mapping[str, Any]) -> bool:
    if value is False or value == "" or value == [] or value == {}:
        return True
    if name == "best_of":
        return value == 1 and not isinstance(value, bool)
    if name in ("tool_choice", "function_call"):  # "none"/"auto" mean nothing without tools
        tools = sent.get("tools" if name == "tool_choice" else "functions")
        return value in ("none", "auto") and not tools
    if name == "modalities":
        return bool(value == ["text"])
    return False


def _short(value: Any) -> str:
    try:
        text = json.dumps(value, default=str, allow_nan=False)
    except ValueError:  # NaN/Infinity inside: quoted in the message as Python writes them
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
