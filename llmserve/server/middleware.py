"""The two ASGI middlewares every app has (create_app stacks them; CORS goes in between).

RequestTracking (outermost): the request id (X-Request-ID echoed, or made up, and returned),
the RequestRecord that metrics and the access line are made from, the generation observer.

Guard (innermost): before any route runs — refuse while draining (503 shutting_down), check the
API key (401) except on the public routes (/health, the chat page and its files), take from the
client's rate-limit bucket (429), and refuse bodies over ``--max-body-size`` (413): at once
when Content-Length says so, otherwise as soon as the bytes received pass the limit, so an
oversized body is never held in memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmserve.engine.types import Finish, TokenEvent
from llmserve.errors import LlmserveError, RequestTooLarge
from llmserve.ids import random_hex
from llmserve.server.access import RequestRecord, current_record, write_access_line
from llmserve.server.auth import ApiKeys
from llmserve.server.errors import error_response, rate_limit_headers, style_for
from llmserve.server.generation import Generation, generation_observer
from llmserve.server.ratelimit import Allowance, RateLimiter
from llmserve.server.routes.webui import is_page_path
from llmserve.server.state import AppState

PUBLIC_PATHS = ("/health", "/v1/health")
METRICS_PATHS = ("/metrics", "/v1/metrics")
UPLOAD_PATHS = ("/v1/files",)
UPLOAD_FRAMING = 64 * 1024
_MAX_REQUEST_ID = 128


class RequestTracking:
    def __init__(self, app: ASGIApp, state: AppState, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.state = state
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(Headers(scope=scope).get("x-request-id"))
        client = scope.get("client")
        record = RequestRecord(
            request_id, scope["method"], scope["path"], client[0] if client else None,
            keep_prompts=self.state.options.log_prompts,
        )
        header = (b"x-request-id", request_id.encode())

        async def send_tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        record_token = current_record.set(record)
        observer_token = generation_observer.set(RequestObserver(record, self.state))
        try:
            await self.app(scope, receive, send_tracked)
        finally:
            generation_observer.reset(observer_token)
            current_record.reset(record_token)
            record.route = _route_label(scope, self.routes)
            self.state.metrics.observe_request(record)
            write_access_line(record)


def _request_id(offered: str | None) -> str:
    if offered and len(offered) <= _MAX_REQUEST_ID and offered.isascii() and offered.isprintable():
        return offered
    return random_hex(32)


def _route_label(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The route's path template (bounded label values), whether or not the router ran."""
    route = scope.get("route")
    if not isinstance(route, Route):
        route = next((r for r in routes if r.matches(scope)[0] != Match.NONE), None)
    return route.path if isinstance(route, Route) else "unmatched"


class RequestObserver:
    """The GenerationObserver of one request: fills its record, feeds metrics, tells the drain."""

    def __init__(self, record: RequestRecord, state: AppState) -> None:
        self.record = record
        self.state = state
        self._first_token_at: float | None = None
        self._tokens_seen = 0

    def started(self, generation: Generation) -> None:
        self.record.generation = generation
        self.record.model = generation.lease.engine.info.id
        self.record.prompt_tokens = len(generation.prompt_tokens)
        if self.record.keep_prompts:
            self.record.output = []
        self.state.drain.generation_started(generation)

    def event(self, generation: Generation, event: TokenEvent | Finish) -> None:
        now = time.monotonic()
        record = self.record
        if isinstance(event, TokenEvent):
            self._tokens_seen += 1
            if self._first_token_at is None:
                self._first_token_at = now
                record.ttft = now - record.started
            if record.output is not None:
                record.output.append(event.text)
            return
        record.generation = None
        record.prompt_tokens = event.prompt_tokens or record.prompt_tokens
        # an Interrupted finish (shutdown) cannot know how many tokens the route already took
        completion = record.completion_tokens = max(event.completion_tokens, self._tokens_seen)
        first = self._first_token_at
        if first is not None and completion >= 2 and now > first:
            record.tokens_per_second = (completion - 1) / (now - first)
        self.state.metrics.observe_generation(record)


class Guard:
    def __init__(self, app: ASGIApp, state: AppState, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.state = state
        self.routes = routes
        options = state.options
        self.keys = ApiKeys(options.api_keys)
        self.limiter = RateLimiter(options.rate_limit) if options.rate_limit else None
        self.max_body_size = options.max_body_size
        # uploads (POST /v1/files) have their own limit: the file plus its multipart framing
        self.max_upload_size = options.max_file_size + UPLOAD_FRAMING

    def _public(self, scope: Scope) -> bool:
        if scope["method"] not in ("GET", "HEAD"):
            return False
        path, options = scope["path"], self.state.options
        return (path in PUBLIC_PATHS or (path in METRICS_PATHS and options.metrics_public)
                or (options.webui and is_page_path(path)))

    def _admit(self, scope: Scope, headers: Headers) -> Allowance | None:
        """Raise the refusal for this request, or return its rate-limit allowance."""
        # /health answers for itself while draining (503 "draining"), so that a load balancer
        # sees why it must stop sending here
        if self.state.drain.draining and scope["path"] not in PUBLIC_PATHS:
            raise self.state.drain.refusal()
        allowance = None
        if not self._public(scope):
            client = scope.get("client")
            identity = self.keys.check(headers) if self.keys else (client[0] if client else "-")
            if self.limiter is not None:
                allowance = self.limiter.take(identity)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self._limit(scope):
            raise self._too_large(scope)
        return allowance

    def _limit(self, scope: Scope) -> int:
        return self.max_upload_size if scope["path"] in UPLOAD_PATHS else self.max_body_size

    def _too_large(self, scope: Scope) -> RequestTooLarge:
        if scope["path"] in UPLOAD_PATHS:
            return RequestTooLarge(
                f"the upload is larger than the server's limit of "
                f"{self.state.options.max_file_size} bytes for a file (--max-file-size)")
        return RequestTooLarge(
            f"the request body is larger than the server's limit of {self.max_body_size} bytes "
            "(--max-body-size)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = current_record.get()
        assert record is not None, "Guard runs inside RequestTracking"
        try:
            allowance = self._admit(scope, Headers(scope=scope))
        except LlmserveError as exc:
            # in the shape of the route it was for (Ollama's clients read {"error": message})
            await error_response(exc, style_for(scope, self.routes))(scope, receive, send)
            return
        received = 0
        limit = self._limit(scope)

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise self._too_large(scope)
                if record.keep_prompts:
                    if record.body is None:
                        record.body = bytearray()
                    record.body.extend(chunk)
            return message

        extra = [] if allowance is None else [
            (name.lower().encode(), value.encode()) for name, value in rate_limit_headers(
                allowance.limit, allowance.remaining, allowance.reset).items()
        ]

        async def send_with_headers(message: Message) -> None:
            if extra and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        self.state.drain.enter(record)
        try:
            await self.app(scope, receive_limited, send_with_headers)
        finally:
            self.state.drain.leave(record)
