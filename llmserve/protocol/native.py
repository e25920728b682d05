"""The seed API's native wire models (/generate, /chat, /generate/batch). No I/O here.

Defaults follow the seed document, not llama.cpp: temperature 0.7, top_p 0.9, top_k 80,
repetition_penalty 1.15, do_sample true (false = greedy). ``max_length`` omitted, 0 or -1 means
"as many as fit in the context, up to the server ceiling"; a larger request is capped, not refused.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmserve.protocol.llamacpp import stop_strings
from llmserve.protocol.openai import ChatMessage

MAX_BATCH_PROMPTS = 64


class _Options(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model_id: str | None = None
    stream: bool = False
    max_length: int | None = Field(default=None, ge=-1)
    temperature: float = Field(default=0.7, ge=0.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    top_k: int = Field(default=80, ge=0)
    repetition_penalty: float = Field(default=1.15, gt=0.0)
    do_sample: bool = True
    seed: int | None = None
    stop: str | list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and not all(isinstance(s, str) for s in v):
            raise ValueError("must be a string or a list of strings")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return None if self.max_length in (None, 0, -1) else self.max_length

    def stop_list(self) -> list[str]:
        return stop_strings(self.stop)


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
