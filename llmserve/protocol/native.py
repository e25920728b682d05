"""The seed API's native wire models (/generate, /chat, /generate/batch). No I/O here.

The seed document's defaults (temperature 0.7, top_p 0.9, top_k 80, repetition_penalty 1.15,
min-p off) are params' FAMILY_DEFAULTS, below a model's configured ones; ``do_sample`` false is
greedy. ``max_length`` omitted, 0 or -1 means "as many as fit in the context, up to the server
ceiling"; a larger request is capped, not refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmserve.params import Family, WireModel
from llmserve.protocol.openai import ChatMessage

MAX_BATCH_PROMPTS = 64


class _Options(WireModel):
    model_config = ConfigDict(extra="ignore")

    FAMILY: ClassVar[Family] = "native"
    MODEL_FIELD: ClassVar[str] = "model_id"
    RENAMES: ClassVar[Mapping[str, str]] = {
        "max_length": "n_predict", "repetition_penalty": "repeat_penalty",
    }

    model_id: str | None = None
    stream: bool = False
    max_length: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    do_sample: bool = True
    seed: int | None = None
    stop: Any = None


class GenerateRequest(_Options):
    prompt: str = Field(min_length=1)


class ChatRequest(_Options):
    messages: list[ChatMessage] = Field(min_length=1)


class BatchRequest(_Options):
    prompts: list[str] = Field(min_length=1, max_length=MAX_BATCH_PROMPTS)

    @field_validator("prompts")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        for i, p in enumerate(v):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
