"""Which models exist, which are loaded; loading on demand (JIT), LRU eviction, idle TTL.

Guarantees:
- A request takes a Lease (an admission ticket + an in-flight count on one loaded engine) for as
  long as its body lives. ``acquire`` loads a known, unloaded model first (JIT); while a model
  loads, other requests for it get 503 ``model_loading`` at once.
- At most ``max_loaded_models`` are loaded. Loading one more unloads the least recently used
  (idle ones first), and that engine is closed only after its in-flight requests have finished;
  a model on its way out still counts until then (it holds its memory).
- A model whose engine dies (its worker thread ends with an exception) is seen at the next
  request, /health or /metrics: the cause is logged once, the request gets 503 ``model_failed``
  and the model is reloaded in the background (POST /v1/models/load reloads it too).
- A load that fails leaves the server serving: models unloaded to make room for it are loaded
  back, and the error (ModelLoadError, 400) reaches the caller.
- A model idle for its keep-alive (the config's ``ttl``, or a request's ``ttl``/``keep_alive``)
  is unloaded; ``None`` keeps it loaded, 0 unloads it as soon as its requests finish.

Everything here runs on the event loop except the loader and ``close``, which run in a worker
thread. Loads are serialised by one lock. Unloading never takes it, so a busy model's unload
stalls nobody: a model leaves service at once (a plain step on the event loop, atomic) and its
engine is closed by a task of its own once its requests are done.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import anyio.to_thread

from llmserve.admission import Admission, Ticket
from llmserve.clock import Clock, SystemClock, Timer
from llmserve.config import ModelSpec, model_id_from_file
from llmserve.engine.types import EngineProtocol, ModelInfo
from llmserve.errors import (
    LlmserveError,
    ModelFailed,
    ModelLoading,
    ModelNotFound,
    NoModelLoaded,
)

log = logging.getLogger("llmserve.registry")

HostState = Literal["ready", "loading", "no_model"]
ModelState = Literal["loaded", "loading", "not-loaded"]
Loader = Callable[[ModelSpec], EngineProtocol]
Check = Callable[[ModelSpec], object]

# "keep the model's own keep-alive" (a request without ttl/keep_alive)
KEEP = object()


class _Slot:
    """A loaded engine with its admission, in-flight count and keep-alive."""

    def __init__(self, spec: ModelSpec, engine: EngineProtocol, admission: Admission,
                 on_idle: Callable[[_Slot], None], clock: Clock) -> None:
        self.spec = spec
        self.engine = engine
        self.admission = admission
        self.keep_alive: float | None = spec.ttl
        self._clock = clock
        self.last_used = clock.monotonic()
        self.expires_at: float | None = None  # wall-clock time of the idle unload
        self.timer: Timer | None = None
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._on_idle = on_idle
        self.failure_logged = False

    def hold(self) -> None:
        self.in_flight += 1
        self.idle.clear()
        self.last_used = self._clock.monotonic()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.expires_at = None

    def drop(self) -> None:
        self.in_flight -= 1
        self.last_used = self._clock.monotonic()
        if self.in_flight == 0:
            self.idle.set()
            self._on_idle(self)


class Lease:
    """Holds the engine for a while: an unload or a swap waits until every lease is released.
    ``ticket`` is the admission place a generation holds; quick reads (tokenising) hold none."""

    def __init__(self, slot: _Slot, ticket: Ticket | None) -> None:
        self._slot: _Slot | None = slot
        self.engine = slot.engine
        self.sampling_defaults: dict[str, Any] = slot.spec.sampling
        self._ticket = ticket
        slot.hold()

    def release(self) -> None:
        if self._slot is None:
            return
        if self._ticket is not None:
            self._ticket.release()
        self._slot.drop()
        self._slot = None


@dataclass(frozen=True)
class ModelStatus:
    spec: ModelSpec
    state: ModelState
    info: ModelInfo | None = None  # when loaded
    expires_at: float | None = None  # wall-clock time of the idle unload, when scheduled
    keep_alive: float | None = None  # seconds idle before unloading; None = forever
    in_flight: int = 0
    # when loaded: its engine died (requests get 503 model_failed until it is reloaded)
    failed: bool = False
    error: str | None = None  # why it failed, when it did
    slots: int = 0  # --parallel
    slots_busy: int = 0  # admitted requests that hold a slot
    queued: int = 0  # admitted requests waiting for one


class ModelHost:
    def __init__(
        self,
        loader: Loader,
        *,
        max_queue: int,
        engine: EngineProtocol | None = None,
        specs: Iterable[ModelSpec] = (),
        max_loaded_models: int = 1,
        check: Check | None = None,
        spec_for_path: Callable[[Path], ModelSpec] | None = None,
        clock: Clock | None = None,
    ) -> None:
        """``engine``: one already loaded (its spec is the one in ``specs`` with its id, or one
        made from its path). ``check`` validates a model cheaply before anything is unloaded
        for it (the CLI reads the GGUF header); ``spec_for_path`` makes the spec of a model
        loaded by path (POST /v1/models/load); ``clock`` drives idle times and keep-alive
        timers (tests pass one they advance by hand)."""
        self._loader = loader
        self._check = check
        self._spec_for_path = spec_for_path or (
            lambda p: ModelSpec(id=model_id_from_file(p), path=p)
        )
        self._clock: Clock = clock or SystemClock()
        self.max_queue = max_queue
        self.max_loaded_models = max_loaded_models
        self.known: dict[str, ModelSpec] = {}
        self._names: dict[str, str] = {}
        self._loaded: OrderedDict[str, _Slot] = OrderedDict()
        self._pending: dict[str, asyncio.Task[_Slot]] = {}
        # out of service, closing once their requests are done (see _retire)
        self._retiring: dict[_Slot, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        for spec in specs:
            self._register(spec)
        if engine is not None:
            spec = self.known.get(engine.info.id) or ModelSpec(
                id=engine.info.id, path=Path(engine.info.path)
            )
            self._register(spec)
            self._loaded[spec.id] = self._wrap(spec, engine)

    # -- what is known -------------------------------------------------------------------------

    def _register(self, spec: ModelSpec) -> None:
        self.known[spec.id] = spec
        for name in (spec.id, *spec.aliases):
            self._names.setdefault(name, spec.id)

    def resolve(self, name: str | None) -> ModelSpec:
        """The model a request's ``model`` names: an id or alias; with one model known, any
        name (clients send arbitrary ones); no name: the most recently used loaded model."""
        if name and name in self._names:
            return self.known[self._names[name]]
        if len(self.known) == 1:
            return next(iter(self.known.values()))
        if not name:
            if self._loaded:
                return self._loaded[next(reversed(self._loaded))].spec
            if self.known:
                return next(iter(self.known.values()))
            raise NoModelLoaded("no model is loaded; load one with POST /v1/models/load",
                                retry_after=5.0)
        raise ModelNotFound(
            f"model {name!r} not found; known models: {', '.join(self.known)}", param="model"
        )

    def lookup(self, name: str) -> ModelSpec:
        """A model by exact id or alias (no fallback), else 404."""
        if name in self._names:
            return self.known[self._names[name]]
        raise ModelNotFound(
            f"model {name!r} not found; known models: {', '.join(self.known)}", param="model"
        )

    def statuses(self) -> list[ModelStatus]:
        out: list[ModelStatus] = []
        for spec in self.known.values():
            slot = self._loaded.get(spec.id)
            if slot is not None:
                admission = slot.admission
                out.append(ModelStatus(
                    spec, "loaded", slot.engine.info, slot.expires_at, slot.keep_alive,
                    slot.in_flight, failed=self._is_dead(slot),
                    error=_public_cause(slot.engine.failure),
                    slots=admission.parallel,
                    slots_busy=min(admission.in_system, admission.parallel),
                    queued=admission.waiting,
                ))
            else:
                out.append(ModelStatus(spec, "loading" if spec.id in self._pending
                                       else "not-loaded", keep_alive=spec.ttl))
        return out

    @property
    def state(self) -> HostState:
        if self._loaded:
            return "ready"
        return "loading" if self._pending else "no_model"

    @property
    def loading(self) -> list[str]:
        return list(self._pending)

    @property
    def engine(self) -> EngineProtocol | None:
        """The most recently used loaded engine."""
        return self._loaded[next(reversed(self._loaded))].engine if self._loaded else None

    @property
    def admission(self) -> Admission | None:
        return self._loaded[next(reversed(self._loaded))].admission if self._loaded else None

    # -- requests ------------------------------------------------------------------------------

    def borrow(self, model: str | None = None) -> Lease:
        """Hold a loaded engine without taking an admission place (tokenise, render a
        template): never refused for being busy, but an unload still waits for it."""
        return Lease(self._loaded_slot(model), None)

    def current(self, model: str | None = None) -> EngineProtocol:
        """The loaded engine a request names (for reads that need no admission): 503 while it
        loads, is not loaded or has failed; 404 for an unknown name."""
        return self._loaded_slot(model).engine

    def _loaded_slot(self, model: str | None) -> _Slot:
        spec = self.resolve(model)
        slot = self._serving(spec)
        if slot is None:
            self._raise_not_ready(spec)
        return slot

    async def acquire(self, model: str | None = None, keep_alive: object = KEEP) -> Lease:
        """Admit one request to a model, loading it first if it is known but not loaded (JIT).
        ``keep_alive`` (seconds, None = forever) replaces the model's keep-alive. Raises at
        once: 503 while a model loads, when admission is full or when the model's engine has
        died (it is then reloaded in the background); 404 for an unknown name."""
        spec = self.resolve(model)
        slot = self._serving(spec)
        if slot is not None:
            return self._admit(slot, keep_alive)
        if self._pending:
            # Loads run one at a time; starting another now would only thrash (or unload the
            # model that is being loaded): ask the client to come back.
            loading = ", ".join(self._pending)
            raise ModelLoading(f"model {loading} is loading; retry shortly", retry_after=5.0)
        slot = await self._load_held(spec)
        try:
            return self._admit(slot, keep_alive)
        finally:
            slot.drop()

    def _serving(self, spec: ModelSpec) -> _Slot | None:
        """The loaded slot of ``spec``, or None when it is not loaded. A slot whose engine has
        died leaves service and is reloaded in the background; the caller gets ModelFailed."""
        slot = self._loaded.get(spec.id)
        if slot is None or not self._is_dead(slot):
            return slot
        failure = slot.engine.failure
        if isinstance(failure, ModelFailed):
            # the engine said why, and a reload in this process cannot help (an RPC server
            # lost mid-decode): it stays failed, and /health keeps saying why
            raise ModelFailed(failure.message, retry_after=failure.retry_after)
        self._retire(slot)
        if spec.id not in self._pending:
            self._start_load(spec).add_done_callback(_drop_hold)
        raise ModelFailed(f"model {spec.id} stopped working and is being reloaded; retry "
                          "shortly", retry_after=5.0)

    def _is_dead(self, slot: _Slot) -> bool:
        """Whether the slot's engine has died; the first time it is seen, the cause is logged
        (the only place it goes: clients get ModelFailed's message)."""
        failure = slot.engine.failure
        if failure is None:
            return False
        if not slot.failure_logged:
            slot.failure_logged = True
            log.error("model %s failed: its engine's worker thread died (%s: %s); the next "
                      "request reloads it", slot.spec.id, type(failure).__name__, failure,
                      exc_info=failure)
        return True

    def _raise_not_ready(self, spec: ModelSpec) -> NoReturn:
        if spec.id in self._pending:
            raise ModelLoading(f"model {spec.id} is loading; retry shortly", retry_after=5.0)
        raise NoModelLoaded(f"model {spec.id} is not loaded; load it with POST /v1/models/load",
                            retry_after=5.0)

    def _admit(self, slot: _Slot, keep_alive: object) -> Lease:
        ticket = slot.admission.reserve()
        if keep_alive is not KEEP:
            slot.keep_alive = keep_alive if isinstance(keep_alive, float | int) else None
        # A slot just loaded for this caller may already be on its way out (another load
        # chose it while the caller woke up): it still serves this request before closing.
        if self._loaded.get(slot.spec.id) is slot:
            self._loaded.move_to_end(slot.spec.id)
        return Lease(slot, ticket)

    # -- loading -------------------------------------------------------------------------------

    async def load(self, target: str) -> EngineProtocol:
        """Load a model by id, alias or path (a new path becomes a known model once it has
        loaded); a model whose engine died is loaded afresh. Returns the engine; raises
        ModelLoadError (models kept serving), 503 while it is loading, or 404."""
        spec = self._target_spec(target)
        slot = self._loaded.get(spec.id)
        if slot is not None and not self._is_dead(slot):
            self._loaded.move_to_end(spec.id)
            return slot.engine
        if spec.id in self._pending:
            self._raise_not_ready(spec)
        slot = await self._load_held(spec)
        slot.drop()
        return slot.engine

    def _target_spec(self, target: str) -> ModelSpec:
        if target in self._names:
            return self.known[self._names[target]]
        path = Path(target).expanduser()
        if not (target.endswith(".gguf") or "/" in target or "\\" in target or path.exists()):
            return self.lookup(target)
        resolved = path.resolve()
        for spec in self.known.values():
            if spec.path.resolve() == resolved:
                return spec
        spec = self._spec_for_path(path)
        n, base = 1, spec.id
        while spec.id in self._names:
            n += 1
            spec = spec.model_copy(update={"id": f"{base}-{n}"})
        return spec

    def _start_load(self, spec: ModelSpec) -> asyncio.Task[_Slot]:
        """Load ``spec`` in a task of its own (a caller that goes away does not abandon a load
        half-way); its result is the slot with one hold taken for whoever takes it."""
        task = asyncio.create_task(self._load(spec))
        self._pending[spec.id] = task
        task.add_done_callback(lambda _t: self._pending.pop(spec.id, None))
        return task

    async def _load_held(self, spec: ModelSpec) -> _Slot:
        task = self._start_load(spec)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_drop_hold)
            raise

    async def _load(self, spec: ModelSpec) -> _Slot:
        # The lock serialises loads only; unloading never takes it (see _retire).
        async with self._lock:
            slot = self._loaded.get(spec.id)
            if slot is not None and self._is_dead(slot):
                self._retire(slot)
                slot = None
            if slot is None:
                if self._check is not None:
                    await anyio.to_thread.run_sync(self._check, spec)
                evicted = await self._make_room(spec)
                try:
                    slot = await self._load_now(spec)
                except BaseException:
                    for old in evicted:
                        try:
                            await self._load_now(old)
                        except Exception as exc:  # the original error is the one to report
                            log.error("could not load %s back: %s", old.id, exc)
                    raise
            slot.hold()
            return slot

    async def _make_room(self, spec: ModelSpec) -> list[ModelSpec]:
        """Retire least recently used models (idle ones first) until one more fits, and wait
        until the engines on their way out have closed: a model still finishing requests
        holds its memory, so it counts against ``max_loaded_models`` until it is closed."""
        evicted: list[ModelSpec] = []
        while len(self._loaded) >= self.max_loaded_models:
            victim = min(self._loaded.values(), key=lambda s: (s.in_flight > 0, s.last_used))
            log.info("unloading %s to make room for %s", victim.spec.id, spec.id)
            evicted.append(victim.spec)
            self._retire(victim)
        while self._retiring and len(self._loaded) + len(self._retiring) >= self.max_loaded_models:
            await asyncio.wait(set(self._retiring.values()),
                               return_when=asyncio.FIRST_COMPLETED)
        return evicted

    async def _load_now(self, spec: ModelSpec) -> _Slot:
        log.info("loading %s from %s", spec.id, spec.path)
        t0 = self._clock.monotonic()
        engine = await anyio.to_thread.run_sync(self._loader, spec)
        self._register(spec)
        slot = self._wrap(spec, engine)
        self._loaded[spec.id] = slot
        log.info("loaded %s in %.1f s", spec.id, self._clock.monotonic() - t0)
        self._schedule_expiry(slot)
        return slot

    def _wrap(self, spec: ModelSpec, engine: EngineProtocol) -> _Slot:
        admission = Admission(parallel=engine.info.n_parallel, max_queue=self.max_queue)
        return _Slot(spec, engine, admission, self._schedule_expiry, self._clock)

    # -- unloading -----------------------------------------------------------------------------

    async def unload(self, model: str | None = None) -> bool:
        """Unload one model (by id or alias) or, with None, all; returns once their engines
        are closed (after their requests). False if none was loaded. Other loads and unloads
        go on meanwhile."""
        target = self.lookup(model).id if model else None
        slots = [s for mid, s in self._loaded.items() if target in (None, mid)]
        closing = [self._retire(slot) for slot in slots]
        if closing:
            # shielded: a caller that goes away does not leave an engine half-closed
            await asyncio.shield(asyncio.gather(*closing))
        return bool(slots)

    def _retire(self, slot: _Slot) -> asyncio.Task[None]:
        """Phase one, at once (atomic on the event loop, so no lock): take the slot out of
        service. Phase two, in a task of its own: close its engine once its requests are done.
        Returns that task (the same one if the slot is already retiring)."""
        if self._loaded.get(slot.spec.id) is slot:
            del self._loaded[slot.spec.id]
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        slot.expires_at = None
        task = self._retiring.get(slot)
        if task is None:
            task = asyncio.ensure_future(self._close_when_idle(slot))
            self._retiring[slot] = task
        return task

    async def _close_when_idle(self, slot: _Slot) -> None:
        try:
            await slot.idle.wait()
            await anyio.to_thread.run_sync(slot.engine.close)
            log.info("unloaded %s", slot.spec.id)
        except Exception:  # out of service already; nothing else to undo
            log.exception("closing %s failed", slot.spec.id)
        finally:
            # before the task completes, so that whoever waits on it sees the room it made
            self._retiring.pop(slot, None)

    # -- keep-alive ----------------------------------------------------------------------------

    def _schedule_expiry(self, slot: _Slot) -> None:
        if slot.keep_alive is None or self._loaded.get(slot.spec.id) is not slot:
            return
        slot.expires_at = self._clock.time() + slot.keep_alive
        slot.timer = self._clock.call_later(slot.keep_alive, lambda: self._expire(slot))

    def _expire(self, slot: _Slot) -> None:
        slot.timer = None
        if self._loaded.get(slot.spec.id) is slot and slot.in_flight == 0:
            log.info("unloading %s: idle for %.0f s", slot.spec.id, slot.keep_alive or 0)
            self._retire(slot)

    def start(self) -> None:
        """Start the keep-alive countdown of the models loaded before the server ran."""
        for slot in self._loaded.values():
            if slot.timer is None and slot.in_flight == 0:
                self._schedule_expiry(slot)

    async def close(self) -> None:
        # a load under way finishes first (its errors were reported already)
        await asyncio.gather(*self._pending.values(), return_exceptions=True)
        await self.unload()
        await asyncio.gather(*self._retiring.values(), return_exceptions=True)


def _public_cause(failure: BaseException | None) -> str | None:
    """What a client may read about a failure: our own errors' messages (an RPC server lost,
    say), never a llama.cpp internal."""
    return failure.message if isinstance(failure, LlmserveError) else None


def _drop_hold(task: asyncio.Task[_Slot]) -> None:
    """Nobody waits for this load any more (its caller went away, or it reloads a failed
    model in the background): give back the hold it would have turned into a lease, or log
    why it failed."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        task.result().drop()
    else:
        log.error("loading in the background failed: %s", exc)
