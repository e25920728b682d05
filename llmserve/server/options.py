"""ServerOptions: how the HTTP layer protects and reports itself (one object for create_app)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmserve.config import Settings
from llmserve.defaults import DEFAULT_MAX_BODY_SIZE, DEFAULT_MAX_FILE_SIZE, DEFAULT_SHUTDOWN_TIMEOUT
from llmserve.server.chat_plan import ChatDefaults
from llmserve.server.ratelimit import RateLimit


@dataclass(frozen=True)
class ServerOptions:
    api_keys: tuple[str, ...] = ()
    metrics_public: bool = False
    rate_limit: RateLimit | None = None
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    cors_origins: tuple[str, ...] = ()
    log_format: Literal["text", "json"] = "text"
    log_prompts: bool = False
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    instance_name: str | None = None
    webui: bool = True
    chat: ChatDefaults = field(default_factory=ChatDefaults)

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerOptions:
        """Raises ValueError for an unreadable --api-key-file."""
        rate = settings.effective_rate_limit()
        return cls(
            api_keys=settings.all_api_keys(),
            metrics_public=settings.metrics_public,
            rate_limit=None if rate is None else RateLimit(*rate, burst=settings.rate_burst),
            max_body_size=settings.max_body_size,
            max_file_size=settings.max_file_size,
            cors_origins=tuple(settings.cors_origin),
            log_format=settings.log_format,
            log_prompts=settings.log_prompts,
            shutdown_timeout=settings.shutdown_timeout,
            instance_name=settings.instance_name,
            webui=settings.webui,
            chat=ChatDefaults(settings.tool_parser, settings.chat_template_kwargs,
                              settings.reasoning_format),
        )
