"""The one place that turns exceptions into HTTP responses (OpenAI error envelope)."""

from __future__ import annotations

import logging
import math

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmserve.errors import AuthenticationError, LlmserveError, RateLimited, ServiceUnavailable
from llmserve.server.access import current_record

log = logging.getLogger("llmserve.server")


def error_response(exc: LlmserveError) -> JSONResponse:
    _note(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, ServiceUnavailable | RateLimited):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, RateLimited) and exc.limit is not None:
        headers.update(rate_limit_headers(exc.limit, exc.remaining, exc.reset))
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


def rate_limit_headers(limit: int, remaining: int, reset: float) -> dict[str, str]:
    """The client's bucket: capacity, whole requests left now, seconds until it is full."""
    return {
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(math.ceil(reset)),
    }


def error_payload(exc: BaseException) -> dict[str, object]:
    """The envelope for an error met mid-stream (sent as an SSE ``data:`` event)."""
    if isinstance(exc, LlmserveError):
        _note(exc)
        return exc.to_dict()
    return _internal().to_dict()


def _note(exc: LlmserveError) -> None:
    """Tell the current request's access record (metrics' rejection reasons read it)."""
    record = current_record.get()
    if record is not None:
        record.error_code = exc.code or exc.type


def _internal() -> LlmserveError:
    return LlmserveError("internal server error; the server log has the details")


async def handle_llmserve_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LlmserveError)
    return error_response(exc)


async def handle_http_exception(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err = LlmserveError(exc.detail or "error")
    body = err.to_dict()
    error = body["error"]
    assert isinstance(error, dict)
    error["type"] = "invalid_request_error" if exc.status_code < 500 else "server_error"
    error["code"] = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def handle_unexpected(_request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    return error_response(_internal())
