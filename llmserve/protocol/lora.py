"""LoRA adapter routes' wire models: llama-server's /lora-adapters and the run-time
/v1/lora/load and /v1/lora/unload. No I/O here."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from llmserve.params import LoraScale


class ScalesRequest(RootModel[list[LoraScale]]):
    """POST /lora-adapters: ``[{"id", "scale"}]``; adapters not listed get scale 0."""


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)
    scale: float = Field(default=1.0, allow_inf_nan=False)
    model: str | None = None


class UnloadLoraRequest(BaseModel):
    """An adapter by ``id`` or by the ``path`` it was loaded from."""

    model_config = ConfigDict(extra="forbid")
    id: int | None = Field(default=None, ge=0)
    path: str | None = None
    model: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> UnloadLoraRequest:
        if (self.id is None) == (self.path is None):
            raise ValueError("give the adapter's id or its path (one of them)")
        return self
