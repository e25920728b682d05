"""What ``llmserve embed`` runs: vectors for texts from a running server (POST /v1/embeddings,
through llmserve.client, the client every client command shares) or from a GGUF loaded in this
process, and their output as JSON lines or a .npy array."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np

from llmserve.client import Client
from llmserve.engine.pooling import Pooling
from llmserve.errors import InvalidRequest

# inputs per request: keeps each body well under the server's default 4 MB limit
CHUNK = 128


def embed_remote(client: Client, texts: Sequence[str], *, model: str | None = None
                 ) -> np.ndarray:
    """Unit-length vectors (n_texts, n_embd) from the server's /v1/embeddings. Raises the
    client's errors (ServerUnreachable, ServerError, ...), each with its exit code."""
    rows: list[list[float]] = []
    for start in range(0, len(texts), CHUNK):
        body: dict[str, object] = {"input": list(texts[start:start + CHUNK])}
        if model:
            body["model"] = model
        rows.extend(item["embedding"] for item in client.post("/v1/embeddings", body)["data"])
    return np.asarray(rows, dtype=np.float32)


def embed_local(path: Path, texts: Sequence[str], *, pooling: Pooling | None = None,
                ctx_size: int = 4096, threads: int | None = None) -> np.ndarray:
    """Unit-length vectors from ``path`` loaded in this process (no server): the same engine
    and checks as the server's /v1/embeddings."""
    from llmserve.gguf_info import read_gguf

    read_gguf(path)  # a missing or broken file is one clear error, before llama.cpp loads
    from llmserve.engine.embedder import Embedder
    from llmserve.engine.pooling import normalise

    engine = Embedder.load(path, n_ctx=ctx_size, n_threads=threads, pooling=pooling)
    try:
        info = engine.info.embedding
        assert info is not None
        if info.pooling in ("none", "rank"):
            raise InvalidRequest(f"{path.name} has pooling {info.pooling}: give --pooling mean, "
                                 "cls or last", param="pooling")
        sequences = []
        for i, text in enumerate(texts):
            tokens = engine.tokenize(text)
            if not text or len(tokens) > info.max_tokens:
                raise InvalidRequest(f"input {i + 1} is empty or longer than "
                                     f"{info.max_tokens} tokens", param="input")
            sequences.append(tokens)
        vectors = asyncio.run(engine.embed(sequences))
    finally:
        engine.close()
    return np.stack([normalise(v, 2) for v in vectors]) if vectors else np.zeros((0, 0))


def write(vectors: np.ndarray, fmt: str, out: IO[bytes]) -> None:
    """``json``: one JSON array per line; ``npy``: one float32 (n, n_embd) array."""
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, vectors.astype(np.float32))
        out.write(buffer.getvalue())
        return
    for row in vectors:
        out.write(json.dumps(row.tolist(), allow_nan=False).encode() + b"\n")
