"""What ``llmserve embed`` runs: vectors for texts from a running server (POST /v1/embeddings)
or from a GGUF loaded in this process, and their output as JSON lines or a .npy array.

The HTTP part is small on purpose: the coordinator folds it into llmserve/client.py (the client
every client command shares) when that lands.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np

from llmserve.engine.pooling import Pooling
from llmserve.errors import InvalidRequest, LlmserveError

DEFAULT_URL = "http://127.0.0.1:8080"
# inputs per request: keeps each body well under the server's default 4 MB limit
CHUNK = 128


class ClientError(LlmserveError):
    """The server answered with an error, or could not be reached (CLI only)."""

    code = "client_error"


def base_url(url: str | None) -> str:
    """--url, else LLMSERVE_URL, else the default port on loopback; without a trailing /v1."""
    value = (url or os.environ.get("LLMSERVE_URL") or DEFAULT_URL).rstrip("/")
    return value.removesuffix("/v1")


def embed_remote(url: str, texts: Sequence[str], *, model: str | None = None,
                 api_key: str | None = None, timeout: float = 600.0) -> np.ndarray:
    """Unit-length vectors (n_texts, n_embd) from a server's /v1/embeddings."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rows: list[list[float]] = []
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
        for start in range(0, len(texts), CHUNK):
            body: dict[str, object] = {"input": list(texts[start:start + CHUNK])}
            if model:
                body["model"] = model
            try:
                response = client.post("/v1/embeddings", json=body)
            except httpx.HTTPError as exc:
                raise ClientError(f"cannot reach {url}: {exc}") from None
            if response.status_code != 200:
                raise ClientError(f"{url}/v1/embeddings answered {response.status_code}: "
                                  f"{_message(response.text)}")
            rows.extend(item["embedding"] for item in response.json()["data"])
    return np.asarray(rows, dtype=np.float32)


def _message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text.strip()[:500]


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
