"""FakeEmbedder: the embedding engine contract (EmbeddingEngine) without llama.cpp, for the fast
tier. One token per character (plus a leading 1, the "CLS"); a vector is a fixed function of
the token sequence, so equal inputs give equal vectors and different ones differ. A rank model
scores a pair by how many query characters the document shares. ``gate``: embed waits for it
(tests hold a request in flight)."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from llmserve.engine.pooling import Vector
from llmserve.engine.types import (
    EmbeddingInfo,
    GenerationRequest,
    GenerationStream,
    ModelInfo,
    SamplingParams,
    SlotState,
)
from llmserve.errors import InvalidRequest, WrongModelKind

SEP = 2


@dataclass
class FakeEmbedder:
    model_id: str = "fake-embed"
    pooling: str = "mean"
    n_embd: int = 8
    max_tokens: int = 16
    parallel: int = 1
    calls: list[list[list[int]]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    entered: int = 0
    closed: bool = False

    def __post_init__(self) -> None:
        self._info = ModelInfo(
            id=self.model_id, path=f"/models/{self.model_id}.gguf", n_ctx=self.max_tokens,
            n_ctx_train=self.max_tokens, n_parallel=self.parallel, n_layer=2, n_gpu_layers=0,
            gpu_offload_supported=False, chat_template=None, created=1,
            embedding=EmbeddingInfo(pooling=self.pooling, n_embd=self.n_embd,
                                    max_tokens=self.max_tokens),
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def failure(self) -> BaseException | None:
        return None

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return ([1] if add_special else []) + [3 + ord(c) % 90 for c in text]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(chr(t) for t in tokens)

    def check_tokens(self, tokens: Sequence[int], param: str) -> None:
        bad = [t for t in tokens if not 0 <= t < 100]
        if bad:
            raise InvalidRequest(f"token ids out of range 0..99: {bad[:5]}", param=param)

    def rerank_tokens(self, query: str, document: str) -> list[int]:
        return [*self.tokenize(query), SEP, *self.tokenize(document, add_special=False)]

    def _no(self) -> NoReturn:
        raise WrongModelKind(f"model {self.model_id} is an embedding model", param="model")

    def format_chat(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> str:
        self._no()

    def prepare_sampling(self, params: SamplingParams) -> SamplingParams:
        self._no()

    def submit(self, request: GenerationRequest) -> GenerationStream:
        self._no()

    def slot_states(self) -> list[SlotState]:
        return []

    def close(self) -> None:
        self.closed = True

    def vector(self, tokens: Sequence[int]) -> Vector:
        if self.pooling == "rank":
            cut = list(tokens).index(SEP)
            query, doc = set(tokens[1:cut]), set(tokens[cut + 1:])
            return np.array([len(query & doc) - 0.01 * len(doc)], dtype=np.float32)
        rng = np.random.default_rng(zlib.crc32(bytes(t % 256 for t in tokens)))
        if self.pooling == "none":
            return rng.standard_normal((len(tokens), self.n_embd)).astype(np.float32)
        return rng.standard_normal(self.n_embd).astype(np.float32)

    async def embed(self, inputs: Sequence[Sequence[int]]) -> list[Vector]:
        self.calls.append([list(x) for x in inputs])
        self.entered += 1
        if self.gate is not None:
            await self.gate.wait()
        return [self.vector(x) for x in inputs]
