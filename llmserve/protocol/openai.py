"""OpenAI wire models (requests, responses, chunks, errors). No I/O here.

Requests ignore unknown keys: SillyTavern and others forward whole settings objects.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from llmserve.config import Duration
from llmserve.ids import random_hex

T = TypeVar("T")


def sequence_breakers(v: Any) -> Any:
    """DRY sequence breakers as a list. SillyTavern keeps the setting as JSON text and some
    builds send it unparsed: a JSON array in a string is read as the list, any other string is
    one breaker (llama-server's reading)."""
    if isinstance(v, str):
        try:
            parsed = json.loads(v)
        except json.JSONDecodeError:
            return [v]
        return parsed if isinstance(parsed, list) else [v]
    return v


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """Image, audio and file parts: accepted in the schema, refused by the route (text-only)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file", "refusal"]


ContentPart = Annotated[TextPart | OtherPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        extra = self.model_extra or {}
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.content is None and not extra.get("tool_calls"):
            raise ValueError("an assistant message needs content or tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts: list[str] = []
        for part in self.content:
            if isinstance(part, TextPart):
                parts.append(part.text)
            else:
                raise ValueError(f"content parts of type {part.type!r} are not supported: this "
                                 "server runs text-only models")
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str | None = None
    strict: bool | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``; json_object may carry a ``schema`` (llama-server's
    extension)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    def schema_or_none(self) -> dict[str, Any] | None:
        if self.type == "json_object":
            return self.schema_ or {}
        if self.type == "json_schema":
            return self.json_schema.schema_ if self.json_schema else {}
        return None


def _finite(
    *names: str, ge: float | None = None, gt: float | None = None, le: float | None = None
) -> Any:
    """An optional finite number field; ``names`` are accepted aliases besides the field's own
    name (the first one)."""
    alias = AliasChoices(*names) if len(names) > 1 else None
    return Field(default=None, allow_inf_nan=False, validation_alias=alias, ge=ge, gt=gt, le=le)


INT32_MAX = 2**31 - 1  # llama.cpp's int32_t parameters


class _Sampling(_Request):
    """Sampling fields shared by chat and text completions: OpenAI's names plus llama.cpp's
    (and the aliases SillyTavern's backends send). Names match SamplingParams."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = _finite("temperature", ge=0.0)
    dynatemp_range: float | None = _finite("dynatemp_range", ge=0.0)
    dynatemp_exponent: float | None = _finite("dynatemp_exponent", ge=0.0)
    top_p: float | None = _finite("top_p", ge=0.0, le=1.0)
    # -1 and 0 both mean off (vLLM clients send -1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = _finite("min_p", ge=0.0, le=1.0)
    typical_p: float | None = _finite("typical_p", "typical", ge=0.0, le=1.0)
    top_n_sigma: float | None = _finite("top_n_sigma")
    xtc_probability: float | None = _finite("xtc_probability", ge=0.0, le=1.0)
    xtc_threshold: float | None = _finite("xtc_threshold", ge=0.0, le=1.0)
    presence_penalty: float | None = _finite("presence_penalty", ge=-2.0, le=2.0)
    frequency_penalty: float | None = _finite("frequency_penalty", ge=-2.0, le=2.0)
    repeat_penalty: float | None = _finite(
        "repeat_penalty", "repetition_penalty", "rep_pen", gt=0.0
    )
    # -1 = the whole context
    repeat_last_n: int | None = Field(default=None, ge=-1)
    dry_multiplier: float | None = _finite("dry_multiplier", ge=0.0)
    dry_base: float | None = _finite("dry_base", ge=1.0)
    dry_allowed_length: int | None = Field(default=None, ge=0, le=INT32_MAX)
    dry_penalty_last_n: int | None = Field(default=None, ge=-1)
    # a JSON array of strings, or that array as a JSON string (text-generation-webui's form)
    dry_sequence_breakers: list[str] | None = None
    mirostat: int | None = Field(default=None, ge=0, le=2)
    mirostat_tau: float | None = _finite("mirostat_tau", ge=0.0)
    mirostat_eta: float | None = _finite("mirostat_eta", ge=0.0)
    min_keep: int | None = Field(default=None, ge=0, le=INT32_MAX)
    seed: int | None = None
    ignore_eos: bool | None = None
    # sampler order: llama.cpp names, or its one-letter string form ("edskypmxt")
    samplers: list[str] | str | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's {"token id": bias} or llama.cpp's [[token id, bias | false], ...]
    logit_bias: dict[str, float | bool] | list[Any] | None = None
    user: str | None = None
    # How long the model stays loaded once idle: LM Studio's ttl (seconds), Ollama's keep_alive
    # ("5m", seconds; negative = forever, 0 = unload after this request).
    ttl: float | None = None
    keep_alive: Duration = None

    def keep_alive_seconds(self, default: T) -> float | T | None:
        """The request's keep-alive in seconds (None = forever), or ``default`` if it gave
        none."""
        if "keep_alive" in self.model_fields_set:
            return self.keep_alive
        if "ttl" in self.model_fields_set and self.ttl is not None:
            return None if self.ttl < 0 else self.ttl
        return default

    def explicit_fields(self) -> set[str]:
        """The fields this request set to a value (not null)."""
        return {name for name in self.model_fields_set if getattr(self, name) is not None}

    _breakers = field_validator("dry_sequence_breakers", mode="before")(sequence_breakers)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and not all(isinstance(s, str) for s in v):
            raise ValueError("stop must be a string or a list of strings")
        return v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _empty_bias(cls, v: object) -> object:
        return None if v == [] else v  # SillyTavern sends [] for "no biases"

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("prompt must be a string or a list holding exactly one string")
        return v

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class LoadModelRequest(_Request):
    """A model id or alias, or a GGUF path (``id`` is accepted for ``model``)."""

    model: str = Field(min_length=1, validation_alias=AliasChoices("model", "id"))


class UnloadModelRequest(_Request):
    model: str | None = Field(default=None, validation_alias=AliasChoices("model", "id"))


# -- responses ------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{random_hex(24)}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    timings: dict[str, int | float] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    timings: dict[str, int | float] | None = None


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
