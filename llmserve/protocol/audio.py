"""OpenAI's /v1/audio/transcriptions and /v1/audio/translations form fields. No I/O here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmserve.audio.formats import ResponseFormat


class TranscriptionForm(BaseModel):
    """The multipart fields besides ``file``. ``timestamp_granularities`` is sent as repeated
    ``timestamp_granularities[]`` fields (the openai SDK's form)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    language: str | None = Field(default=None, min_length=1)
    prompt: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    response_format: ResponseFormat = "json"
    timestamp_granularities: list[Literal["segment", "word"]] = ["segment"]
