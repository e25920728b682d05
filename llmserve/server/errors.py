"""The one place that turns exceptions into HTTP responses.

Three renderings of the same exception tree, chosen per route family:

- ``openai`` (every route by default): ``{"error": {"message", "type", "param", "code"}}``.
- ``detail`` (the seed's native routes, marked with ``@detail_errors``): ``{"detail": message}``,
  with the class's ``detail_status`` where it differs (413 for a prompt that cannot fit).
- ``ollama`` (Ollama's /api/* routes, marked with ``@ollama_errors``): ``{"error": message}``
  with the class's status, the shape Ollama's clients read (its docs/api/errors.mdx); the
  ``ollama`` Python library raises it as ``ResponseError(message, status)``.

The style is read from the matched endpoint (Starlette puts it in ``scope["endpoint"]``, also for
a 405 on a known path); the guard's refusals before routing find it with ``style_for``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from llmserve.errors import AuthenticationError, LlmserveError, RateLimited, ServiceUnavailable
from llmserve.server.access import current_record

log = logging.getLogger("llmserve.server")

ErrorStyle = Literal["openai", "detail", "ollama"]
E = TypeVar("E", bound=Callable[..., object])


def detail_errors(endpoint: E) -> E:
    """Mark a route endpoint whose errors render as ``{"detail": ...}``."""
    endpoint.error_style = "detail"  # type: ignore[attr-defined]
    return endpoint


def ollama_errors(endpoint: E) -> E:
    """Mark a route endpoint whose errors render as ``{"error": message}``."""
    endpoint.error_style = "ollama"  # type: ignore[attr-defined]
    return endpoint


def style_of(request: Request) -> ErrorStyle:
    style: ErrorStyle = getattr(request.scope.get("endpoint"), "error_style", "openai")
    return style


def style_for(scope: Scope, routes: Sequence[BaseRoute]) -> ErrorStyle:
    """The error style of the route ``scope`` is for, before the router has run (the guard's
    refusals: draining, API key, rate limit, body size)."""
    partial: ErrorStyle | None = None
    for route in routes:
        match, child = route.matches(scope)
        style: ErrorStyle = getattr(child.get("endpoint"), "error_style", "openai")
        if match == Match.FULL:
            return style
        if match == Match.PARTIAL and partial is None:
            partial = style
    return partial or "openai"


def error_body(exc: LlmserveError, style: ErrorStyle = "openai") -> dict[str, object]:
    if style == "detail":
        return {"detail": exc.message}
    if style == "ollama":
        return {"error": exc.message}
    return exc.to_dict()


def error_response(exc: LlmserveError, style: ErrorStyle = "openai") -> JSONResponse:
    _note(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, ServiceUnavailable | RateLimited):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, RateLimited) and exc.limit is not None:
        headers.update(rate_limit_headers(exc.limit, exc.remaining, exc.reset))
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    status = exc.status
    if style == "detail" and exc.detail_status is not None:
        status = exc.detail_status
    return JSONResponse(error_body(exc, style), status_code=status, headers=headers)


def rate_limit_headers(limit: int, remaining: int, reset: float) -> dict[str, str]:
    """The client's bucket: capacity, whole requests left now, seconds until it is full."""
    return {
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(math.ceil(reset)),
    }


def error_payload(exc: BaseException, style: ErrorStyle = "openai") -> dict[str, object]:
    """The body for an error met mid-stream (sent as an SSE ``data:`` event)."""
    if isinstance(exc, LlmserveError):
        _note(exc)
        return error_body(exc, style)
    log.error("error during a stream", exc_info=exc)
    return error_body(_internal(), style)


def _note(exc: LlmserveError) -> None:
    """Tell the current request's access record (metrics' rejection reasons read it)."""
    record = current_record.get()
    if record is not None:
        record.error_code = exc.code or exc.type


def _internal() -> LlmserveError:
    return LlmserveError("internal server error; the server log has the details")


async def handle_llmserve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LlmserveError)
    return error_response(exc, style_of(request))


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail or "error"
    style = style_of(request)
    if style != "openai":
        return JSONResponse(error_body(LlmserveError(message), style),
                            status_code=exc.status_code, headers=exc.headers)
    body = LlmserveError(message).to_dict()
    error = body["error"]
    assert isinstance(error, dict)
    error["type"] = "invalid_request_error" if exc.status_code < 500 else "server_error"
    error["code"] = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    return error_response(_internal(), style_of(request))
