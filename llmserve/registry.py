"""Which model is loaded, and swapping it safely.

The host owns at most one engine. Requests take a Lease (an admission ticket + an in-flight
count on that engine) for as long as their body lives. A load runs off the event loop; while it
runs, new requests get 503 ``model_loading``. The old engine is closed only after its in-flight
requests have finished, and a load that fails leaves the old engine serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Literal

import anyio.to_thread

from llmserve.engine.types import EngineProtocol
from llmserve.errors import ModelLoading, NoModelLoaded
from llmserve.server.admission import Admission, Ticket

log = logging.getLogger("llmserve.registry")

HostState = Literal["ready", "loading", "no_model"]
Loader = Callable[[str], EngineProtocol]


class _Slot:
    """An engine with its admission and in-flight count."""

    def __init__(self, engine: EngineProtocol, admission: Admission) -> None:
        self.engine = engine
        self.admission = admission
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()


class Lease:
    """Holds the engine for a while: an unload or a swap waits until every lease is released.
    ``ticket`` is the admission place a generation holds; quick reads (tokenising) hold none."""

    def __init__(self, slot: _Slot, ticket: Ticket | None) -> None:
        self._slot: _Slot | None = slot
        self.engine = slot.engine
        self._ticket = ticket
        slot.in_flight += 1
        slot.idle.clear()

    def release(self) -> None:
        if self._slot is None:
            return
        if self._ticket is not None:
            self._ticket.release()
        self._slot.in_flight -= 1
        if self._slot.in_flight == 0:
            self._slot.idle.set()
        self._slot = None


class ModelHost:
    def __init__(
        self,
        loader: Loader,
        *,
        max_queue: int,
        engine: EngineProtocol | None = None,
    ) -> None:
        self._loader = loader
        self.max_queue = max_queue
        self._slot: _Slot | None = None
        self._loading: str | None = None
        self._lock = asyncio.Lock()
        if engine is not None:
            self._slot = self._wrap(engine)

    def _wrap(self, engine: EngineProtocol) -> _Slot:
        return _Slot(engine, Admission(parallel=engine.info.n_parallel, max_queue=self.max_queue))

    @property
    def state(self) -> HostState:
        if self._loading is not None:
            return "loading"
        return "ready" if self._slot is not None else "no_model"

    @property
    def engine(self) -> EngineProtocol | None:
        return self._slot.engine if self._slot else None

    @property
    def admission(self) -> Admission | None:
        return self._slot.admission if self._slot else None

    def lease(self) -> Lease:
        """Admit one request to the current engine, or raise a 503 at once."""
        slot = self._ready_slot()
        return Lease(slot, slot.admission.reserve())

    def borrow(self) -> Lease:
        """Hold the current engine without taking an admission place (tokenise, render a
        template): never refused for being busy, but an unload still waits for it."""
        return Lease(self._ready_slot(), None)

    def current(self) -> EngineProtocol:
        """The engine serving now (for reads that need no admission), or the same 503 as
        ``lease``."""
        return self._ready_slot().engine

    def _ready_slot(self) -> _Slot:
        if self._loading is not None:
            raise ModelLoading(f"a model is loading ({self._loading}); retry shortly",
                               retry_after=5.0)
        if self._slot is None:
            raise NoModelLoaded(
                "no model is loaded; load one with POST /v1/models/load", retry_after=5.0
            )
        return self._slot

    async def load(self, path: str) -> EngineProtocol:
        """Load ``path`` and make it current. Raises what the loader raises (old engine kept)."""
        async with self._lock:
            self._loading = path
            try:
                engine = await anyio.to_thread.run_sync(self._loader, path)
            finally:
                self._loading = None
            old, self._slot = self._slot, self._wrap(engine)
        if old is not None:
            await self._retire(old)
        log.info("loaded %s as %s", path, engine.info.id)
        return engine

    async def unload(self) -> bool:
        async with self._lock:
            old, self._slot = self._slot, None
        if old is None:
            return False
        await self._retire(old)
        return True

    async def _retire(self, slot: _Slot) -> None:
        await slot.idle.wait()
        await anyio.to_thread.run_sync(slot.engine.close)

    async def close(self) -> None:
        await self.unload()

