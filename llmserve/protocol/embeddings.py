"""Embedding and rerank wire models: OpenAI's /v1/embeddings (LM Studio's /api/v0/embeddings is
the same), llama.cpp's /embedding, Ollama's /api/embed and legacy /api/embeddings, and the
Jina/Cohere rerank shape. Each is a ``params.WireModel`` (no generation fields): the model and
keep-alive go through ``params.normalise`` and ``generation.model_name`` like every request's.
Every request's inputs come out as ``inputs()``: strings and token arrays, in order.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmserve.params import WireModel
from llmserve.units import Duration

# a string, a list of strings, one token array or a list of token arrays (OpenAI's forms)
Inputs = str | list[str] | list[int] | list[list[int]]
Input = str | list[int]


def as_list(value: Inputs) -> list[Input]:
    """The inputs of any accepted form, one item per input."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(x, int) for x in value):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


def _normalize(value: int) -> int:
    if value < -1:
        raise ValueError("must be -1 (none), 0 (max absolute), 2 (euclidean) or another p > 0 "
                         "(p-norm)")
    return value


class _Request(WireModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None


class OpenAIEmbeddingRequest(_Request):
    FAMILY = "openai"
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # extensions, as llama-server: inputs beyond the context are cut rather than refused;
    # the normalisation (OpenAI's vectors are unit length: 2)
    truncate: bool = False
    normalize: int = 2

    _check_normalize = field_validator("normalize")(_normalize)

    def inputs(self) -> list[Input]:
        return as_list(self.input)


class LlamaCppEmbeddingRequest(_Request):
    """llama-server's /embedding: ``content`` (or ``input``), ``normalize`` as its
    embd_normalize (default 2, euclidean)."""

    FAMILY = "llamacpp"
    content: Inputs | None = None
    input: Inputs | None = None
    normalize: int = 2
    truncate: bool = False

    _check_normalize = field_validator("normalize")(_normalize)

    def inputs(self) -> list[Input] | None:
        value = self.content if self.content is not None else self.input
        return None if value is None else as_list(value)


class OllamaEmbedRequest(_Request):
    """Ollama's /api/embed: L2-normalised vectors; ``truncate`` defaults to true there."""

    FAMILY = "native"
    input: str | list[str]
    truncate: bool = True
    keep_alive: Duration = None

    def keep_alive_seconds(self) -> float | Literal["model"] | None:
        return self.keep_alive if "keep_alive" in self.model_fields_set else "model"

    def inputs(self) -> list[Input]:
        return as_list(self.input)


class OllamaLegacyEmbeddingRequest(_Request):
    """Ollama's older /api/embeddings: one ``prompt``, one vector (not normalised)."""

    FAMILY = "native"
    prompt: str
    keep_alive: Duration = None

    def keep_alive_seconds(self) -> float | Literal["model"] | None:
        return self.keep_alive if "keep_alive" in self.model_fields_set else "model"


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str


class RerankRequest(_Request):
    """Jina's and Cohere's rerank (llama-server's /v1/rerank): ``documents`` as strings or
    ``{text}`` objects; ``top_n`` best first; ``return_documents`` (default true, as Jina)."""

    FAMILY = "llamacpp"
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True
    truncate: bool = False

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]
