"""Ollama's wire models (its docs/api.md): POST /api/chat and /api/generate with their
``options``, and the model-management bodies. No I/O here.

``options`` is the generation vocabulary under Ollama's names (``Options``, a WireModel of the
"ollama" family); the request models add ``format`` (a JSON schema, or "json" for any JSON
object) and ``keep_alive``. Unknown option names are refused naming the option, unlike Ollama,
which logs and drops them: a misspelt sampler setting should not pass unnoticed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmserve.errors import InvalidRequest, UnsupportedParameter
from llmserve.params import Family, Wire, WireModel
from llmserve.units import Duration

# Ollama's load-time options: in llmserve the server's flags decide them when a model loads
# (--n-gpu-layers, --threads, ...). They change speed or memory, never the text, so a request
# carrying them is served as if they matched. num_keep only matters when Ollama shifts the
# context, which llmserve never does (it refuses a request that does not fit instead).
LOAD_TIME_OPTIONS = (
    "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
    "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep",
    "draft_num_predict",
)


class Options(WireModel):
    """The ``options`` object. ``num_ctx`` asks for a context window (at most the loaded one);
    ``num_predict`` -1 and -2 both mean "until the context is full"."""

    model_config = ConfigDict(extra="allow")

    FAMILY: ClassVar[Family] = "ollama"
    RENAMES: ClassVar[Mapping[str, str]] = {"num_predict": "n_predict", "num_ctx": "n_ctx"}

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    seed: int | None = None
    stop: Any = None
    num_predict: int | None = None
    num_ctx: int | None = None
    # samplers llama.cpp no longer has: refused unless they ask for its behaviour
    tfs_z: float | None = None  # tail-free sampling; 1 = off
    penalize_newline: bool | None = None  # llama.cpp penalises newlines like any token
    # accepted, see LOAD_TIME_OPTIONS
    numa: Any = None
    num_batch: Any = None
    num_gpu: Any = None
    main_gpu: Any = None
    low_vram: Any = None
    f16_kv: Any = None
    logits_all: Any = None
    vocab_only: Any = None
    use_mmap: Any = None
    use_mlock: Any = None
    embedding_only: Any = None
    num_thread: Any = None
    num_keep: Any = None
    draft_num_predict: Any = None

    def wire(self) -> Wire:
        for name in self.model_extra or {}:
            known = ", ".join(n for n in type(self).model_fields if n not in LOAD_TIME_OPTIONS)
            raise InvalidRequest(f"invalid 'options.{name}': unknown option; llmserve's "
                                 f"options are {known} (and Ollama's load-time options, which "
                                 "the server's flags decide)", param=f"options.{name}")
        if self.tfs_z is not None and self.tfs_z != 1.0:
            raise UnsupportedParameter(
                "'options.tfs_z' (tail-free sampling) is not supported: llama.cpp removed that "
                "sampler; leave it out or send 1", param="options.tfs_z")
        if self.penalize_newline is False:
            raise UnsupportedParameter(
                "'options.penalize_newline': false is not supported: llama.cpp's penalties "
                "apply to every token; leave it out", param="options.penalize_newline")
        wire = super().wire()
        values = dict(wire.values)
        if values.get("n_predict") == -2:  # Ollama's "fill the context"
            values["n_predict"] = -1
        return dataclasses.replace(
            wire, values=values,
            names={key: f"options.{name}" for key, name in wire.names.items()},
            stops=tuple((f"options.{name}", value) for name, value in wire.stops),
        )


class _Request(WireModel):
    model_config = ConfigDict(extra="ignore")

    FAMILY: ClassVar[Family] = "ollama"

    model: str = Field(min_length=1)
    format: dict[str, Any] | Literal["", "json"] | None = None
    options: Options | None = None
    stream: bool = True
    keep_alive: Duration = None
    # reasoning models: true or a level asks for the thinking to be returned apart
    think: bool | Literal["low", "medium", "high", "max"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_keep_alive_is_unset(cls, data: Any) -> Any:
        # Ollama reads a null keep_alive as "not given" (its default); -1 is "forever"
        if isinstance(data, dict) and "keep_alive" in data and data["keep_alive"] is None:
            return {k: v for k, v in data.items() if k != "keep_alive"}
        return data

    def keep_alive_seconds(self) -> float | Literal["model"] | None:
        return self.keep_alive if "keep_alive" in self.model_fields_set else "model"

    @property
    def keep_alive_zero(self) -> bool:
        """keep_alive 0: unload as soon as the request is done."""
        return "keep_alive" in self.model_fields_set and self.keep_alive == 0

    def wire(self) -> Wire:
        if self.logprobs or self.top_logprobs:
            name = "logprobs" if self.logprobs else "top_logprobs"
            raise UnsupportedParameter(f"'{name}' is not supported on /api/* yet; leave it "
                                       "out (the OpenAI routes return logprobs)", param=name)
        opts = (self.options or Options()).wire()
        values, names = dict(opts.values), dict(opts.names)
        if self.format is not None and self.format != "":
            # "json": any JSON object, as OpenAI's json_object
            values["json_schema"] = {} if self.format == "json" else self.format
            names["json_schema"] = "format"
        return Wire("ollama", values, names, opts.stops, {}, self.model,
                    self.keep_alive_seconds())


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[str] | None = None
    tool_calls: list[Any] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class ChatRequest(_Request):
    """An empty ``messages`` loads the model (or, with keep_alive 0, unloads it)."""

    messages: list[Message] = Field(default_factory=list)
    tools: list[Any] | None = None


class GenerateRequest(_Request):
    """An empty ``prompt`` loads the model (or, with keep_alive 0, unloads it)."""

    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None  # Ollama's older spelling
    verbose: bool = False

    @property
    def target(self) -> str:
        if not (self.model or self.name):
            raise InvalidRequest("invalid 'model': this field is required", param="model")
        return self.model or self.name or ""


class ManageRequest(BaseModel):
    """The bodies of pull, push, create, copy and delete: only the names matter (for the
    refusal's message)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None
    source: str | None = None
    destination: str | None = None
