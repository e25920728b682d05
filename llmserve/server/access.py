"""One record per HTTP request, and the access-log line written from it.

The request-tracking middleware creates the record and makes it the *current* one (a context
variable, so everything running for that request — error rendering, the generation observer —
fills it in without being handed it). When the response is over it becomes one access line.
Prompts and outputs are kept only when ``--log-prompts`` asks for them.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmserve.server.generation import Generation

access_log = logging.getLogger("llmserve.access")


@dataclass(eq=False)
class RequestRecord:
    request_id: str
    method: str
    path: str
    client: str | None
    keep_prompts: bool = False
    started: float = field(default_factory=time.monotonic)
    route: str = "unmatched"
    status: int | None = None
    error_code: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft: float | None = None
    tokens_per_second: float | None = None
    body: bytearray | None = None
    output: list[str] | None = None
    generation: Generation | None = None

    def fields(self) -> dict[str, Any]:
        """What the access line says, in a fixed order; absent values are left out."""
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "client": self.client,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "status": self.status,
            "duration_s": round(time.monotonic() - self.started, 4),
            "error": self.error_code,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": None if self.ttft is None else round(self.ttft, 4),
            "tokens_per_s": None if self.tokens_per_second is None
            else round(self.tokens_per_second, 2),
        }
        if self.keep_prompts:
            out["request_body"] = (self.body or b"").decode("utf-8", "replace")
            out["output"] = None if self.output is None else "".join(self.output)
        return {k: v for k, v in out.items() if v is not None}


current_record: ContextVar[RequestRecord | None] = ContextVar("llmserve_request", default=None)


def write_access_line(record: RequestRecord) -> None:
    """Text: ``client "METHOD path" status key=value ...``; --log-format json uses the fields."""
    fields = record.fields()
    rest = dict(fields)
    head = (f'{rest.pop("client", "-")} "{rest.pop("method")} {rest.pop("path")}" '
            f'{rest.pop("status", "-")}')
    tail = " ".join(f"{key}={_text_value(value)}" for key, value in rest.items())
    access_log.info("%s %s", head, tail, extra={"access": fields})


def _text_value(value: object) -> str:
    if isinstance(value, str) and (not value or any(c.isspace() or c in "\"=" for c in value)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


class JsonFormatter(logging.Formatter):
    """``--log-format json``: one JSON object per line; access lines carry their fields."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)
