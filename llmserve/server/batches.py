"""The Batch API's runner: a batch's lines through the server's own routes, durably.

Each line is one in-process call of the endpoint it names (the app's router, the same route
code an HTTP client reaches, so a line's ``response.body`` is exactly what that endpoint
answers), run as background work (``generation.background_work``): the scheduler puts it behind
interactive requests and preempts it when a chat needs its slot. As many lines run at once as
the model has slots, so a batch keeps every slot busy while nothing else is asked.

Durability: a line's result is committed (``Store.record_line``, with the batch's new counts)
the moment it finishes; a line without a result has not finished. After a restart or a crash,
``in_progress`` batches go on with the lines that have no result, so no finished line runs
twice. The output and error files are written once every line has a result.

Lines the server refuses for the moment (503: busy, loading, shutting down) are retried, not
recorded; any other status is the line's result (4xx/5xx ones go to the error file).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message

from llmserve.errors import LlmserveError
from llmserve.ids import object_id, random_hex
from llmserve.protocol import openai as oa
from llmserve.registry import ModelHost
from llmserve.server.errors import handle_http_exception, handle_llmserve_error, handle_unexpected
from llmserve.server.generation import background_work, generation_observer
from llmserve.store import Store

log = logging.getLogger("llmserve.batches")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
# statuses a batch is still being worked on in (resumed after a restart)
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
RETRY_DELAY_S = 0.25

# the app's exception handlers, as Starlette's ExceptionMiddleware hands them to a route: a
# line's error renders exactly as it would over HTTP
_HANDLERS: tuple[dict[Any, Any], dict[int, Any]] = (
    {LlmserveError: handle_llmserve_error, HTTPException: handle_http_exception,
     Exception: handle_unexpected},
    {},
)


class BatchRunner:
    """Runs active batches one after another, oldest first, on the event loop."""

    def __init__(self, app: ASGIApp, router: ASGIApp, store: Store, host: ModelHost) -> None:
        self.app = app
        self.router = router
        self.store = store
        self.host = host
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._current: str | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._cancelled: set[str] = set()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        """Stop at once: lines in flight are dropped unrecorded and run again after a restart."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Mark ``batch`` cancelling; the lines in flight are stopped and it ends ``cancelled``
        with the results so far."""
        batch = {**batch, "status": "cancelling", "cancelling_at": oa.now()}
        self.store.put_batch(batch)
        self._cancelled.add(batch["id"])
        if self._current == batch["id"]:
            for worker in self._workers:
                worker.cancel()
        self.wake()
        return batch

    async def _loop(self) -> None:
        while True:
            active = self.store.batches_with_status(*ACTIVE)
            if not active:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._run(active[0])
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop every later batch: this one fails
                log.exception("batch %s failed", active[0]["id"])
                self._finalize({**active[0], "status": "failed", "failed_at": oa.now()})

    async def _run(self, batch: dict[str, Any]) -> None:
        batch_id = batch["id"]
        if batch["status"] != "cancelling" and batch_id not in self._cancelled:
            if batch["status"] == "validating":
                batch = {**batch, "status": "in_progress", "in_progress_at": oa.now()}
                self.store.put_batch(batch)
            lines = collections.deque(self.store.unfinished_lines(batch_id))
            self._current = batch_id
            self._workers = [asyncio.ensure_future(self._work(batch, lines))
                             for _ in range(min(self._parallel(), len(lines)))]
            try:
                await asyncio.gather(*self._workers, return_exceptions=True)
            finally:
                for worker in self._workers:
                    worker.cancel()
                self._current = None
                self._workers = []
        latest = self.store.get_batch(batch_id) or batch
        cancelled = latest["status"] == "cancelling" or batch_id in self._cancelled
        if not cancelled and self.store.unfinished_lines(batch_id):
            raise RuntimeError("a batch worker stopped with lines left")
        if cancelled:
            self._cancelled.discard(batch_id)
            self._finalize({**latest, "status": "cancelled", "cancelled_at": oa.now()})
        else:
            self._finalize({**latest, "status": "completed", "completed_at": oa.now()})

    def _parallel(self) -> int:
        """Lines at once: the slots of the model loaded last (1 before any is loaded)."""
        admission = self.host.admission
        return admission.parallel if admission is not None else 1

    async def _work(self, batch: dict[str, Any],
                    lines: collections.deque[tuple[int, str, dict[str, Any]]]) -> None:
        while lines:
            line, custom_id, body = lines.popleft()
            status, answer = await self._call(batch["endpoint"], body)
            ok = 200 <= status < 300
            result = {
                "id": object_id("batch_req"),
                "custom_id": custom_id,
                "response": {"status_code": status, "request_id": random_hex(32),
                             "body": answer},
                "error": None,
            }
            completed, failed = self.store.result_counts(batch["id"])
            completed, failed = completed + ok, failed + (not ok)
            latest = self.store.get_batch(batch["id"]) or batch
            latest["request_counts"] = {"total": latest["request_counts"]["total"],
                                        "completed": completed, "failed": failed}
            self.store.record_line(latest, line, ok, result)

    async def _call(self, path: str, body: Mapping[str, Any]) -> tuple[int, Any]:
        """POST ``body`` to ``path`` through the router, as background work; retried while the
        server answers 503."""
        payload = json.dumps({**body, "stream": False}, allow_nan=False).encode()
        while True:
            status, raw = await self._post(path, payload)
            if status != 503:
                break
            await asyncio.sleep(RETRY_DELAY_S)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    async def _post(self, path: str, payload: bytes) -> tuple[int, bytes]:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
            "root_path": "", "query_string": b"", "server": None, "client": None,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode())],
            "app": self.app, "starlette.exception_handlers": _HANDLERS,
        }
        sent = False
        status = 500
        chunks: list[bytes] = []

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await asyncio.Event().wait()  # never disconnects; cancelled with the line
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        background = background_work.set(True)
        observer = generation_observer.set(None)
        try:
            await self.router(scope, receive, send)
        finally:
            generation_observer.reset(observer)
            background_work.reset(background)
        return status, b"".join(chunks)

    def _finalize(self, batch: dict[str, Any]) -> None:
        """Write the output and error files from the recorded lines; then the batch's end."""
        batch_id = batch["id"]
        completed, failed = self.store.result_counts(batch_id)
        batch["request_counts"] = {"total": batch["request_counts"]["total"],
                                   "completed": completed, "failed": failed}
        batch["finalizing_at"] = batch.get("finalizing_at") or oa.now()
        for ok, key, suffix in ((True, "output_file_id", "output"),
                                (False, "error_file_id", "error")):
            if (completed if ok else failed) == 0:
                continue
            # named after the batch: finalising again after a crash rewrites the same file
            body = {"id": f"file-{suffix}-{batch_id}", "object": "file", "bytes": 0,
                    "created_at": oa.now(), "filename": f"{batch_id}_{suffix}.jsonl",
                    "purpose": "batch_output", "status": "processed", "expires_at": None,
                    "status_details": None}
            lines = (f"{line}\n".encode() for line in self.store.line_results(batch_id, ok))
            self.store.write_file(body, lines)
            batch[key] = body["id"]
        self.store.put_batch(batch)
