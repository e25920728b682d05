"""LM Studio's REST API v0: POST /api/v0/chat/completions and /api/v0/completions.

OpenAI's bodies (the same route code: JIT loading, ``ttl``, streaming) plus, on the answer (or
on the stream's last choice chunk), ``stats`` (tokens_per_second, time_to_first_token and
generation_time in seconds, stop_reason), ``model_info`` (arch, quant, format, context_length:
the loaded context) and ``runtime``, as LM Studio documents them
(lmstudio.ai/docs/developer/rest/endpoints). GET /api/v0/models is in models.py.

time_to_first_token runs from the request's submission to the engine until its first token
was sampled (queueing and reading the prompt); generation_time from then to the end.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmserve.engine.types import Finish
from llmserve.errors import LlmserveError
from llmserve.gguf_info import read_gguf_cached
from llmserve.server.generation import Generation
from llmserve.server.routes import openai


def _llama_cpp_python_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


RUNTIME = {"name": "llama.cpp (llama-cpp-python) in llmserve",
           "version": _llama_cpp_python_version(), "supported_formats": ["gguf"]}


def stop_reason(finish: Finish) -> str:
    """LM Studio's names (its SDK's LLMPredictionStopReason)."""
    if finish.reason == "length":
        return "maxPredictedTokensReached"
    if finish.reason == "cancelled":
        return "userStopped"
    if finish.reason == "error":
        return "failed"
    return "stopStringFound" if finish.stop_word else "eosFound"


def stats(finish: Finish) -> dict[str, Any]:
    seconds = finish.timings.predicted_ms / 1000.0
    return {
        "tokens_per_second": finish.completion_tokens / seconds if seconds > 0 else 0.0,
        "time_to_first_token": round(finish.timings.prompt_ms / 1000.0, 3),
        "generation_time": round(seconds, 3),
        "stop_reason": stop_reason(finish),
    }


async def extras(gen: Generation) -> Callable[[Finish], dict[str, Any]]:
    info = gen.lease.engine.info
    try:
        gguf = await anyio.to_thread.run_sync(read_gguf_cached, info.path)
    except LlmserveError:  # the file moved since it loaded: what the engine knows still holds
        gguf = None
    model_info = {
        "arch": gguf.architecture if gguf else None,
        "quant": gguf.quantization if gguf else None,
        "format": "gguf",
        "context_length": info.n_ctx,
    }

    def render(finish: Finish) -> dict[str, Any]:
        return {"stats": stats(finish), "model_info": model_info, "runtime": RUNTIME}

    return render


async def chat_completions(request: Request) -> Response:
    return await openai.chat_completions(request, extras)


async def completions(request: Request) -> Response:
    return await openai.completions(request, extras)


routes = [
    Route("/api/v0/chat/completions", chat_completions, methods=["POST"]),
    Route("/api/v0/completions", completions, methods=["POST"]),
]
