"""Graceful shutdown: stop admitting, let generations finish, then let uvicorn exit.

uvicorn on its own waits for open streams forever (unless timeout_graceful_shutdown is set) and
runs the lifespan shutdown only after that wait, so it cannot refuse new requests meanwhile. So
the first SIGTERM/SIGINT only starts our Drain: new requests get 503 ``shutting_down`` (the
Guard checks the flag), requests in flight run on until none is left or ``--shutdown-timeout``
passes; then each generation still running is ended with a ``shutting_down`` error (an SSE
error event and ``[DONE]``), and only then is uvicorn told to exit (lifespan shutdown frees the
model). A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

from llmserve.errors import ShuttingDown
from llmserve.server.access import RequestRecord
from llmserve.server.generation import Generation

log = logging.getLogger("llmserve.server")

# After the timeout, how long aborted streams get to send their error event and [DONE].
ABORT_GRACE_S = 5.0


class Drain:
    """Requests in flight, and the draining flag. Event-loop only."""

    def __init__(self) -> None:
        self.draining = False
        self._in_flight: set[RequestRecord] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._abort_cause: ShuttingDown | None = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def refusal(self) -> ShuttingDown:
        return ShuttingDown("the server is shutting down; retry shortly", retry_after=5.0)

    def enter(self, record: RequestRecord) -> None:
        self._in_flight.add(record)
        self._idle.clear()

    def leave(self, record: RequestRecord) -> None:
        self._in_flight.discard(record)
        if not self._in_flight:
            self._idle.set()

    def generation_started(self, generation: Generation) -> None:
        # admitted just before the drain gave up waiting: end it like the others
        if self._abort_cause is not None:
            generation.abort(self._abort_cause)

    async def run(self, timeout: float) -> None:
        """Refuse new requests, wait up to ``timeout`` s for those in flight, then abort the
        generations still running and give them ABORT_GRACE_S to send their last events."""
        self.draining = True
        if await self._wait_idle(timeout):
            return
        self._abort_cause = ShuttingDown(
            f"the server is shutting down and this request ran past the shutdown timeout "
            f"({timeout:g} s)", retry_after=5.0,
        )
        running = [r.generation for r in self._in_flight if r.generation is not None]
        log.warning("shutdown timeout: ending %d running generation(s)", len(running))
        for generation in running:
            generation.abort(self._abort_cause)
        await self._wait_idle(ABORT_GRACE_S)

    async def _wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, timeout: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler would re-raise the signal after shutdown (exit status 143 or a
        # KeyboardInterrupt); a drained shutdown is a clean exit, so it is not recorded.
        if self._drain.draining or self.should_exit or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self._drain.draining = True
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, name: str) -> None:
        log.warning("%s: shutting down; finishing %d request(s) in flight (up to %g s); "
                    "send it again to quit at once", name, self._drain.in_flight, self._timeout)
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self._drain.run(self._timeout)
        self.should_exit = True
