"""The in-process switch: ``ask --local`` / ``chat MODEL.gguf`` with no server running.

The model is loaded here and the server's own ASGI app (the same routes, registry and engine as
``llmserve run``) answers the client's requests in this process, without a socket. So a local
answer is decided by exactly the code a server's would be (params, JSON schema, errors, stop
strings), and the client commands need no second code path. Closing a response while it
streams reaches the route as a client disconnect, which cancels the generation as over HTTP.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmserve.errors import ServerError

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from llmserve.client import Body
    from llmserve.config import ModelSpec
    from llmserve.engine.types import EngineProtocol

# what the app's ``send`` hands the reading thread: ("status", int), ("body", bytes),
# ("end", None) or ("error", Exception)
_Message = tuple[str, Any]


class _LocalResponse:
    def __init__(self, status: int, messages: queue.Queue[_Message],
                 disconnect: Callable[[], None]) -> None:
        self.status = status
        self._messages = messages
        self._disconnect = disconnect

    def chunks(self) -> Iterator[bytes]:
        while True:
            kind, value = self._messages.get()
            if kind == "body":
                yield value
            elif kind == "error":
                raise ServerError(f"the in-process server failed: {value}")
            else:
                return

    def close(self) -> None:
        self._disconnect()


class LocalTransport:
    """An ASGI app served to ``client.Client`` in-process. Its event loop runs in a daemon
    thread (as uvicorn's would), inside the app's lifespan; ``close`` ends the lifespan, which
    unloads the models."""

    description = "in-process"

    def __init__(self, app: Starlette) -> None:
        self._app = app
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, args=(started,), daemon=True,
                                        name="llmserve-local")
        self._thread.start()
        started.result()

    def _main(self, started: Future[None]) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._stop = asyncio.Event()
            try:
                async with self._app.router.lifespan_context(self._app):
                    started.set_result(None)
                    await self._stop.wait()
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                raise

        try:
            self._loop.run_until_complete(serve())
        finally:
            self._loop.close()

    def open(self, method: str, path: str, body: Body | None,
             headers: Mapping[str, str]) -> _LocalResponse:
        if body is not None and not isinstance(body, bytes):
            body = b"".join(body)
        messages: queue.Queue[_Message] = queue.Queue()
        gone = threading.Event()
        disconnected: list[asyncio.Event] = []

        async def call() -> None:
            left = asyncio.Event()
            disconnected.append(left)
            if gone.is_set():
                left.set()
            sent = False

            async def receive() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body or b"", "more_body": False}
                await left.wait()
                return {"type": "http.disconnect"}

            async def send(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    messages.put(("status", message["status"]))
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        messages.put(("body", message["body"]))
                    if not message.get("more_body"):
                        messages.put(("end", None))

            try:
                await self._app(_scope(method, path, headers), receive, send)
            except Exception as exc:  # the app renders its errors; this is a bug in it
                messages.put(("error", exc))
            finally:
                messages.put(("end", None))

        def disconnect() -> None:
            gone.set()
            for event in disconnected:
                self._loop.call_soon_threadsafe(event.set)

        asyncio.run_coroutine_threadsafe(call(), self._loop)
        try:
            kind, value = messages.get()
        except BaseException:  # Ctrl-C before the answer began: cancel it as a client would
            disconnect()
            raise
        if kind != "status":
            raise ServerError(f"the in-process server failed: {value}")
        return _LocalResponse(value, messages, disconnect)

    def close(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()


def _scope(method: str, target: str, headers: Mapping[str, str]) -> dict[str, Any]:
    path, _, query = target.partition("?")
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": urllib.parse.unquote(path), "raw_path": path.encode(),
        "query_string": query.encode(), "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
    }


def open_local(model: Path, load: Callable[[ModelSpec], EngineProtocol]) -> LocalTransport:
    """Load ``model`` with ``load`` (raises LlmserveError, e.g. ModelLoadError) and serve it
    in-process. Other GGUF paths load on demand (``/model PATH`` in chat), one at a time."""
    from llmserve.config import Settings
    from llmserve.registry import ModelHost
    from llmserve.server.app import create_app

    settings = Settings()
    spec = settings.spec_for_path(model)
    host = ModelHost(load, max_queue=settings.max_queue, engine=load(spec), specs=[spec],
                     max_loaded_models=1, spec_for_path=settings.spec_for_path)
    return LocalTransport(create_app(host))
