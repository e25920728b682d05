"""From an admitted embedding or rerank request to vectors, shared by every route family (OpenAI,
llama.cpp, Ollama, LM Studio, rerank), so each route only translates its protocol.

Order, as for generation: resolve the model (``generation.model_name``) and take an admission
place first (503 when full, before any tokenising), then check the model's kind, tokenise off
the event loop, check each input's length, and let the embedding engine batch the inputs with
every other request's. The lease is held until the vectors are back.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import anyio.to_thread
import numpy as np

from llmserve.engine.pooling import Vector, normalise
from llmserve.engine.types import EmbeddingEngine, EmbeddingInfo
from llmserve.errors import EngineError, InputTooLong, InvalidRequest, WrongModelKind
from llmserve.params import Params
from llmserve.protocol.embeddings import Input
from llmserve.registry import KEEP, Lease, ModelHost
from llmserve.server.generation import model_name


@dataclass(frozen=True)
class Embedded:
    vectors: list[Vector]
    prompt_tokens: int
    model: str
    info: EmbeddingInfo


def check_not_empty(inputs: Sequence[Input], param: str) -> None:
    """400 for no inputs or an empty one (before the request takes an admission place)."""
    if not inputs:
        raise InvalidRequest(f"'{param}' is empty: give at least one input", param=param)
    for i, item in enumerate(inputs):
        if len(item) == 0:
            where = f"{param}[{i}]" if len(inputs) > 1 else param
            raise InvalidRequest(f"'{where}' is empty", param=where)


async def _admit(host: ModelHost, params: Params, *, rerank: bool,
                 per_token: bool) -> tuple[Lease, EmbeddingEngine]:
    keep_alive = KEEP if params.keep_alive == "model" else params.keep_alive
    lease = await host.acquire(model_name(host, params.model), keep_alive)
    try:
        info = lease.engine.info
        embedding = info.embedding
        if embedding is None:
            raise WrongModelKind(
                f"model {info.id} is a chat model; serve it for "
                f"{'rerank' if rerank else 'embeddings'} with "
                + ("a reranker GGUF (pooling rank)" if rerank else
                   "--embedding --pooling mean (or embedding = true, pooling = \"mean\" in "
                   "models.toml)"), param="model")
        if rerank and embedding.pooling != "rank":
            raise WrongModelKind(
                f"model {info.id} has no rank head (its pooling is {embedding.pooling}): "
                "rerank needs a reranker GGUF (pooling rank with a classification head)",
                param="model")
        if not rerank and embedding.pooling == "rank":
            raise WrongModelKind(
                f"model {info.id} is a reranker (pooling rank): it scores pairs at /v1/rerank, "
                "it does not embed", param="model")
        if not per_token and embedding.pooling == "none":
            raise InvalidRequest(
                f"model {info.id} has pooling none (one vector per token), which this API "
                "cannot return: use POST /embedding, or serve it with --pooling mean, cls or "
                "last", param="model")
    except BaseException:
        lease.release()
        raise
    return lease, cast(EmbeddingEngine, lease.engine)


def _fit(tokens: list[int], limit: int, truncate: bool, param: str) -> list[int]:
    if len(tokens) <= limit:
        return tokens
    if truncate:
        return tokens[:limit]
    raise InputTooLong(
        f"'{param}' is {len(tokens)} tokens; this model reads at most {limit} tokens per input "
        "(its context). Shorten it, or send \"truncate\": true to cut it", param=param)


async def _run(lease: Lease, engine: EmbeddingEngine, work: Callable[[], list[list[int]]]
               ) -> tuple[list[Vector], int]:
    """Tokenise (``work``, off the loop) and embed; the lease is released either way."""
    try:
        sequences = await anyio.to_thread.run_sync(work)
        vectors = await engine.embed(sequences)
    finally:
        lease.release()
    if not all(np.isfinite(v).all() for v in vectors):
        raise EngineError("the model produced non-finite values (NaN or infinity)")
    return vectors, sum(len(s) for s in sequences)


async def embed(host: ModelHost, params: Params, inputs: Sequence[Input], *, param: str,
                truncate: bool = False, normalize: int = 2,
                per_token: bool = False) -> Embedded:
    """One vector per input (a matrix per input with pooling none, when ``per_token``),
    normalised as llama-server's ``normalize``. Strings are tokenised with the model's
    specials (BOS/CLS, SEP); token arrays are taken as they are."""
    check_not_empty(inputs, param)
    lease, engine = await _admit(host, params, rerank=False, per_token=per_token)
    info = engine.info
    assert info.embedding is not None
    limit = info.embedding.max_tokens

    def work() -> list[list[int]]:
        out: list[list[int]] = []
        for i, item in enumerate(inputs):
            where = f"{param}[{i}]" if len(inputs) > 1 else param
            if isinstance(item, str):
                tokens = engine.tokenize(item, add_special=True)
            else:
                tokens = list(item)
                engine.check_tokens(tokens, where)
            out.append(_fit(tokens, limit, truncate, where))
        return out

    vectors, n_tokens = await _run(lease, engine, work)
    return Embedded([normalise(v, normalize) for v in vectors], n_tokens, info.id,
                    info.embedding)


async def rerank(host: ModelHost, params: Params, query: str, documents: Sequence[str], *,
                 truncate: bool = False) -> tuple[list[float], int, str]:
    """The rank head's score of each document for ``query`` (in document order), the tokens
    read, and the model id."""
    if not query:
        raise InvalidRequest("'query' is empty", param="query")
    check_not_empty(documents, "documents")
    lease, engine = await _admit(host, params, rerank=True, per_token=False)
    info = engine.info
    assert info.embedding is not None
    limit = info.embedding.max_tokens

    def work() -> list[list[int]]:
        return [_fit(engine.rerank_tokens(query, doc), limit, truncate, f"documents[{i}]")
                for i, doc in enumerate(documents)]

    vectors, n_tokens = await _run(lease, engine, work)
    return [float(v[0]) for v in vectors], n_tokens, info.id


def encode(vector: Vector, encoding_format: str) -> list[float] | str:
    """OpenAI's two encodings: a list of floats, or base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return cast(list[float], vector.tolist())
