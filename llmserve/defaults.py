"""The defaults of settings the ``llmserve`` command shows in its options. Apart from config.py
so that the CLI can declare its options without importing pydantic: client commands (``ask``
in a shell loop) must start fast. ``config`` re-exports them."""

from __future__ import annotations

DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PORT = 8080
DEFAULT_CTX = 4096
DEFAULT_MAX_QUEUE = 16
DEFAULT_RATE_LIMIT = "60/minute"
DEFAULT_RATE_BURST = 10
DEFAULT_MAX_BODY_SIZE = 4 * 1024 * 1024
DEFAULT_MAX_FILE_SIZE = 512 * 1024 * 1024
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_MAX_LOADED_MODELS = 1
