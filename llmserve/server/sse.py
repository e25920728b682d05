"""Server-sent events (and Ollama's NDJSON): framing, and a response that stops its body when
the client leaves.

Starlette's StreamingResponse only notices a disconnect when a send fails (ASGI spec ≥ 2.4), so
a stream still waiting in the queue would never learn its client is gone. This response always
listens for ``http.disconnect`` and closes the body generator at once, which runs the route's
``finally`` (cancel the generation, release the slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"


def event(payload: Mapping[str, Any] | str, *, name: str | None = None) -> bytes:
    """One ``data:`` event. Raises ValueError for a payload that JSON cannot carry (NaN,
    Infinity; a lone surrogate fails the encode): that is a bug, and the routes' mid-stream
    error path logs it and sends a 500 error event instead of a byte that is not JSON."""
    data = payload if isinstance(payload, str) else json.dumps(
        payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    )
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {data}\n\n".encode()


def text_event(text: str) -> bytes:
    """A plain-text event (the seed's ``data: <token text>``). A line break inside ``text``
    starts another ``data:`` line, which SSE clients join back with "\n"."""
    return ("".join(f"data: {line}\n" for line in _LINE_BREAK.split(text)) + "\n").encode()


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class EventStreamResponse(Response):
    media_type = "text/event-stream"
    content_type = b"text/event-stream; charset=utf-8"

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        *,
        on_close: Callable[[], None],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """``on_close`` (idempotent) frees what the body holds; it runs however the response
        ends, also when the body generator never started (its own ``finally`` then never
        runs)."""
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.body_iterator = body
        self.extra_headers = dict(headers or {})
        self.init_headers(self.extra_headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", self.content_type),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *((k.lower().encode(), v.encode()) for k, v in self.extra_headers.items()),
        ]
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
            try:
                async with aclosing(self.body_iterator) as body:
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    async for chunk in body:
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass  # the client went away mid-send; aclosing has run the body's cleanup
            finally:
                self.on_close()
                tg.cancel_scope.cancel()


class NdjsonStreamResponse(EventStreamResponse):
    """The same body handling for newline-delimited JSON (Ollama's streams): one object a
    line (``ndjson_line``)."""

    media_type = "application/x-ndjson"
    content_type = b"application/x-ndjson"


def ndjson_line(payload: Mapping[str, Any]) -> bytes:
    """One NDJSON line; the same refusal of NaN as ``event``."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode() + b"\n"


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def until_disconnect(receive: Receive, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run ``work``; if the client disconnects first, cancel it and return None. Errors from
    ``work`` propagate unchanged."""
    task = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
