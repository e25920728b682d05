"""OpenAI wire models (requests, responses, chunks, errors). No I/O here.

Requests ignore unknown keys: SillyTavern and others forward whole settings objects.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from llmserve.ids import random_hex
from llmserve.params import OPENAI_CHAT_ONLY, OPENAI_UNSUPPORTED, Family, Wire
from llmserve.protocol.sampling import LlamaCppSampling
from llmserve.units import Duration


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


class _Sampling(_Request, LlamaCppSampling):
    """Generation fields shared by chat and text completions: OpenAI's names plus llama.cpp's
    (and the aliases SillyTavern's backends send). Bounds, defaults and conversions: params."""

    FAMILY: ClassVar[Family] = "openai"
    RENAMES: ClassVar[Mapping[str, str]] = {
        "max_completion_tokens": "n_predict", "max_tokens": "n_predict",
        "repetition_penalty": "repeat_penalty", "rep_pen": "repeat_penalty",
        "typical": "typical_p",
    }
    UNSUPPORTED: ClassVar[Sequence[str]] = OPENAI_UNSUPPORTED

    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    # SillyTavern's other spellings
    typical: float | None = None
    repetition_penalty: float | None = None
    rep_pen: float | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # How long the model stays loaded once idle: LM Studio's ttl (seconds), Ollama's keep_alive
    # ("5m", seconds; negative = forever, 0 = unload after this request).
    ttl: float | None = None
    keep_alive: Duration = None
    # chat: true/false with top_logprobs; completions: how many alternatives (params reads both)
    logprobs: Any = None
    top_logprobs: Any = None
    n: Any = None
    # chat only (params.OPENAI_CHAT_ONLY; checked by server/chat_plan.py)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    chat_template_kwargs: Any = None
    reasoning_format: Any = None
    # not implemented (params.OPENAI_UNSUPPORTED): refused unless "off"
    functions: Any = None
    function_call: Any = None
    best_of: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None

    def keep_alive_seconds(self) -> float | Literal["model"] | None:
        if "keep_alive" in self.model_fields_set:
            return self.keep_alive
        if "ttl" in self.model_fields_set and self.ttl is not None:
            return None if self.ttl < 0 else self.ttl
        return "model"

    def wire(self) -> Wire:
        wire = super().wire()
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return wire
        # llama-server: response_format wins over json_schema
        values = {**wire.values, "json_schema": fmt.schema_or_none()}
        names = {**wire.names, "json_schema": "response_format"}
        return dataclasses.replace(wire, values=values, names=names)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    UNSUPPORTED: ClassVar[Sequence[str]] = OPENAI_UNSUPPORTED + OPENAI_CHAT_ONLY

    prompt: str | list[str]
    echo: bool = False
    # fill-in-the-middle: the text after the completion ("" = none)
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """A chat choice's ``logprobs``."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """A /v1/completions choice's ``logprobs`` (the legacy shape)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: CompletionLogprobs | None = None


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
