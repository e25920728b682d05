"""Embeddings and rerank: OpenAI's POST /v1/embeddings (also LM Studio's /api/v0/embeddings),
llama.cpp's POST /embedding, Ollama's POST /api/embed and /api/embeddings, and POST /v1/rerank
(Jina/Cohere shape, llama-server's route). Thin: parse → params → server/embedding.py → format.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmserve.errors import InvalidRequest, UnsupportedParameter
from llmserve.params import normalise
from llmserve.protocol import embeddings as pe
from llmserve.server import embedding
from llmserve.server.requests import parse
from llmserve.server.state import AppState


async def openai_embeddings(request: Request) -> Response:
    req = await parse(request, pe.OpenAIEmbeddingRequest)
    inputs = req.inputs()
    out = await embedding.embed(AppState.of(request).host, normalise(req.wire()), inputs,
                                param="input", truncate=req.truncate, normalize=req.normalize)
    if req.dimensions is not None and req.dimensions != out.info.n_embd:
        # checked once the model is known; the vectors cannot be shortened meaningfully
        raise UnsupportedParameter(
            f"model {out.model} outputs {out.info.n_embd} dimensions and cannot shorten them: "
            f"'dimensions' must be {out.info.n_embd} or left out", param="dimensions")
    return JSONResponse({
        "object": "list",
        "data": [{"object": "embedding", "index": i,
                  "embedding": embedding.encode(v, req.encoding_format)}
                 for i, v in enumerate(out.vectors)],
        "model": out.model,
        "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens},
    })


async def llamacpp_embedding(request: Request) -> Response:
    """llama-server's non-OpenAI shape: ``[{"index", "embedding": [[...]]}]``: one vector in a
    list when pooled, one per token with pooling none."""
    req = await parse(request, pe.LlamaCppEmbeddingRequest)
    inputs = req.inputs()
    if inputs is None:
        raise InvalidRequest("'content' is required", param="content")
    out = await embedding.embed(AppState.of(request).host, normalise(req.wire()), inputs,
                                param="content", truncate=req.truncate,
                                normalize=req.normalize, per_token=True)
    return JSONResponse([
        {"index": i, "embedding": v.tolist() if v.ndim == 2 else [v.tolist()]}
        for i, v in enumerate(out.vectors)
    ])


async def ollama_embed(request: Request) -> Response:
    started = time.perf_counter()
    req = await parse(request, pe.OllamaEmbedRequest)
    out = await embedding.embed(AppState.of(request).host, normalise(req.wire()), req.inputs(),
                                param="input", truncate=req.truncate, normalize=2)
    return JSONResponse({
        "model": out.model,
        "embeddings": [v.tolist() for v in out.vectors],
        "total_duration": int((time.perf_counter() - started) * 1e9),
        "prompt_eval_count": out.prompt_tokens,
    })


async def ollama_embeddings(request: Request) -> Response:
    req = await parse(request, pe.OllamaLegacyEmbeddingRequest)
    out = await embedding.embed(AppState.of(request).host, normalise(req.wire()), [req.prompt],
                                param="prompt", normalize=-1)
    return JSONResponse({"embedding": out.vectors[0].tolist()})


async def rerank(request: Request) -> Response:
    req = await parse(request, pe.RerankRequest)
    documents = req.texts()
    scores, n_tokens, model = await embedding.rerank(
        AppState.of(request).host, normalise(req.wire()), req.query, documents,
        truncate=req.truncate)
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    results: list[dict[str, Any]] = []
    for i in order[:req.top_n]:
        result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            result["document"] = {"text": documents[i]}
        results.append(result)
    return JSONResponse({
        "object": "list",
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    })


routes = [
    Route("/v1/embeddings", openai_embeddings, methods=["POST"]),
    Route("/embeddings", openai_embeddings, methods=["POST"]),
    Route("/api/v0/embeddings", openai_embeddings, methods=["POST"]),
    Route("/embedding", llamacpp_embedding, methods=["POST"]),
    Route("/api/embed", ollama_embed, methods=["POST"]),
    Route("/api/embeddings", ollama_embeddings, methods=["POST"]),
    Route("/v1/rerank", rerank, methods=["POST"]),
    Route("/rerank", rerank, methods=["POST"]),
]
