"""The worker thread: slots, the decode loop, cancellation and prompt-prefix reuse.

One thread owns the llama.cpp context; nothing else calls into it. Each step it admits waiting
requests into free slots, builds ONE batch holding the next token of every generating slot plus
a chunk of any prompt still being read, calls llama_decode once, then samples for every slot that
produced logits (continuous batching; with one slot it is a plain serial loop). A long prompt
is read over several steps, in small chunks while other slots are generating, so their streams
keep flowing.

Slots share one unified KV cache. A finished or cancelled slot keeps its cells as a prefix
cache (as llama-server does: Stop then Regenerate reuses the prompt); idle caches are dropped
when a decode finds no room. A waiting request joins only when its prompt fits beside what the
running slots hold. If the running slots between them still fill the context, the most recently
started one (a background one first) is preempted rather than failed: its cells are freed, it
goes back to the head of the queue with its prompt and the tokens it has generated so far, and
when room frees up it re-reads them and carries on where it stopped (vLLM's recompute
preemption). A client sees a pause, never a stream cut short.

Background requests (batch lines) wait behind interactive ones, and give up their slot to one
that finds every slot busy: the newest is preempted at once, its cells kept under a spare
sequence id (parked) so that it resumes without reading anything again. While an interactive
prompt is read, the step holds no background work; so a running batch delays a chat's first
token by at most the step that was in flight when it came.

Batching is bit-exact while each sequence's cells sit in position order; after a slot's cache
is trimmed and refilled, llama.cpp may place its new cells before old ones, and logits then
move by up to ~1.6 (measured; see tests/test_real_samplers.py), so a greedy near-tie can flip.
llama-server behaves the same.

Events leave the worker in batches (``GenerationStream.push_all``): one wake-up of the event
loop for all the slots' tokens of a step, and for a fast stream every STREAM_FLUSH_S rather
than every token (a first token or a finish goes at once).

Requests wait in ``_pending`` (FIFO) until a slot frees up; the bound on how many may wait is
admission's job, in front of this. Cancellation is a flag on the stream: the loop checks it every
step, and while a prompt is being read llama.cpp's abort callback checks it between graph nodes.

Cache-aware admission (the decisions are pure functions in ``placement.py``):

1. Cancellations are applied before requests are placed: a slot whose stream was cancelled is
   freed at the start of the same step that places waiting requests, so a prompt resent right
   after its cancelled turn (SillyTavern's Stop then Regenerate) finds that slot free, with the
   whole history cached.
2. A request's prompt starts from the longest prefix any slot holds, not only the slot it takes.
   If a busy slot (its previous turn still streaming because the client's disconnect has not
   reached us yet, or another chat over the same history) shares more than the free slots do,
   the least recently used free slot drops its own cache and shares that slot's cells for the
   prefix (``llama_memory_seq_cp``: in the unified KV cache the cells just gain a sequence id;
   nothing is copied or recomputed). Measured before this: the second turn of a cancelled
   ~1,500-token chat landed on the other slot and re-read the history (12.3 s instead of 0.7 s).
   Recurrent, hybrid and sliding-window models keep only their own slot's cache (their state is
   not a per-position list of cells that a prefix of can be shared).
3. A prompt is read in whole n_batch chunks while no other slot is generating, and in
   PROMPT_CHUNK_WHILE_GENERATING chunks between other slots' tokens only while they stream.
4. Several choices of one prompt (OpenAI ``n``; ``GenerationStream.forks``) are admitted
   together, only when a slot is free for each: the first reads the prompt, and a slot is kept
   for each other one (``Slot.kept_for``; its old cache is dropped as the prompt read starts,
   so that no hole it leaves opens among the choices' cells later). Once the prompt is read,
   each kept slot shares its cells (``llama_memory_seq_cp``) and samples its first token from
   the same logits (``_fork``): one prompt read, and the choices start alike. From there they
   are ordinary slots. Greedy choices stay equal while their cells sit in position order (see
   above): after other requests have left holes in the cache they can part at a near-tie.

LoRA adapters (engine/lora.py) apply to the whole context, so a step decodes only slots that run
with the same adapter set: when the running slots hold several sets, each step takes the next
set in turn (round robin, sets ordered by their oldest request) and switches the context to it
before llama_decode. A slot's cached cells are tied to the set they were computed with
(``Slot.adapters``): a prefix is reused, from its own cache or another slot's, only under the
same set. Adapters are loaded, unloaded and freed between steps (``call``), never beside a
decode.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from llmserve.engine import rpc
from llmserve.engine.model import LoadedModel
from llmserve.engine.output_text import OutputText
from llmserve.engine.placement import (
    MIN_REUSE_FRACTION,
    choose_slot,
    common_prefix_len,
    longest_prefix,
    prompt_chunk,
)
from llmserve.engine.sampler import Sampler
from llmserve.engine.types import (
    AdapterSet,
    Event,
    Finish,
    FinishReason,
    GenerationStream,
    SlotState,
    Timings,
    TokenEvent,
)
from llmserve.errors import LlmserveError, ModelFailed

log = logging.getLogger("llmserve.engine")


# Tokens after a stream's first are handed to the event loop at most this often (see _flush);
# a first token or a finish goes at once.
STREAM_FLUSH_S = 0.02
# A prompt read expected to take longer than this gets the abort callback (see _step); reads of
# at least PROMPT_SPEED_MIN_TOKENS tokens measure the prompt speed that expectation uses.
ABORT_CHECK_MIN_MS = 50.0
PROMPT_SPEED_MIN_TOKENS = 16
# What a stream learns when the worker thread dies (the cause goes to the log only).
WORKER_DIED = "the model's engine stopped unexpectedly"


@dataclass
class _Job:
    stream: GenerationStream
    prompt: list[int]
    sampler: Sampler
    output: OutputText
    n_cached: int
    # what must be in the slot's cache before sampling goes on: the prompt, or after a
    # preemption the prompt plus every token generated so far
    to_read: list[int]
    # index into ``to_read`` of the next token to feed
    n_fed: int
    t_start: float = field(default_factory=time.perf_counter)
    t_prompt_done: float = 0.0
    n_generated: int = 0
    # sampled tokens, in order; the last one is ``next_token`` while that waits to be fed
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None
    # the LoRA adapter set it runs with (fixed when it starts)
    adapters: AdapterSet = ()
    # preempted to make room for an interactive request: the spare sequence id that keeps its
    # cells meanwhile, holding the first ``n_parked`` tokens of ``to_read`` (see _park)
    parked: int | None = None
    n_parked: int = 0


@dataclass
class Slot:
    seq_id: int
    # tokens whose KV cells are in the cache for ``seq_id``, in position order
    cached: list[int] = field(default_factory=list)
    job: _Job | None = None
    last_used: float = 0.0
    # the LoRA adapter set ``cached`` was computed with
    adapters: AdapterSet = ()
    # the request (its first choice's stream) this idle slot is kept for, until its prompt
    # is read and a choice forks into it (see _fork)
    kept_for: GenerationStream | None = None


class Scheduler:
    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.slots = [Slot(i) for i in range(model.n_parallel)]
        # new requests (FIFO), and at the head any preempted job waiting to resume
        self._pending: collections.deque[GenerationStream | _Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        # the exception that ended the worker thread (see _run); read by any thread
        self.failure: Exception | None = None
        # llama.cpp aborted under this model (see rpc.guard_aborts): the worker is parked for
        # good inside llama.cpp and the context must never be touched again
        self.lost = False
        self._batch = llama_cpp.llama_batch_init(model.n_batch, 0, 1)
        # whether a slot may start from cells another slot holds (see the module docstring)
        self._share_prefixes = model.n_parallel > 1 and model.shares_cells
        # spare sequence ids (past the slots' own) -> the preempted background job whose cells
        # they hold (see _park)
        self._parked: dict[int, _Job] = {}
        self._spare_ids = range(model.n_parallel, model.n_seq_max)
        # Only the slots being read may abort a decode, and only when all of them are cancelled.
        self._abortable: list[_Job] = []
        # decode time per batch token of recent prompt reads (None until one is seen)
        self._ms_per_prompt_token: float | None = None
        # events for the event loop, handed over together at the end of each step
        self._outbox: list[tuple[GenerationStream, Event]] = []
        self._urgent = False
        self._last_flush = 0.0
        # work for the worker between steps (adapter loads and unloads), see ``call``
        self._calls: collections.deque[tuple[Callable[[], object], Future[object]]] = (
            collections.deque())
        # round-robin counter over the adapter sets of the running slots
        self._turn = 0
        self._abort_cb = llama_cpp.ggml_abort_callback(self._should_abort)
        self._no_abort_cb = llama_cpp.ggml_abort_callback()
        self._thread = threading.Thread(target=self._run, name="llmserve-engine", daemon=True)
        rpc.guard_aborts()
        rpc.add_abort_listener(self._on_abort)
        self._thread.start()

    # -- called from the event loop ----------------------------------------------------------

    def submit(self, stream: GenerationStream) -> None:
        with self._cond:
            if self.failure is not None:
                raise ModelFailed(f"{WORKER_DIED}; retry shortly", retry_after=5.0)
            if self._stopping:
                raise RuntimeError("scheduler stopped")
            if stream.request.background:
                self._pending.append(stream)
            else:  # interactive requests wait ahead of every background one
                self._pending.insert(self._first_background(), stream)
            self._cond.notify()

    def call(self, work: Callable[[], object]) -> Future[object]:
        """Run ``work`` on the worker thread between two decode steps (any thread may call;
        the future gives its result or exception)."""
        future: Future[object] = Future()
        with self._cond:
            if self.failure is not None or self._stopping:
                raise ModelFailed(f"{WORKER_DIED}; retry shortly", retry_after=5.0)
            self._calls.append((work, future))
            self._cond.notify()
        return future

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.job is not None)

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def preempted(self) -> int:
        """How many of the queued are preempted generations waiting for room to resume."""
        return sum(1 for item in list(self._pending) if isinstance(item, _Job))

    def slot_states(self) -> list[SlotState]:
        """A snapshot for GET /slots. Reads what the worker writes without a lock: each field
        is read once, so the worst case is a value one step old."""
        states: list[SlotState] = []
        for slot in self.slots:
            job = slot.job
            states.append(SlotState(
                id=slot.seq_id,
                n_ctx=self.model.n_ctx,
                n_cached=len(slot.cached),
                request=job.stream.request if job else None,
                n_decoded=job.n_generated if job else 0,
            ))
        return states

    def stop(self) -> None:
        """Finish every request with "cancelled", stop the thread and free the batch."""
        rpc.remove_abort_listener(self._on_abort)
        if self.lost:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)

    def _on_abort(self, message: str, thread: threading.Thread) -> None:
        """llama.cpp is aborting on ``thread`` (which will be parked, not killed): if that is
        this model's worker, or one of its RPC servers is gone, end every request now with the
        reason, since the worker will never come back to do it."""
        lost_servers = [e for e in self.model.rpc_servers if e in rpc.lost_endpoints()]
        if thread is not self._thread and not lost_servers:
            return
        if lost_servers:
            why = (f"the RPC server {', '.join(lost_servers)} stopped answering (llama.cpp: "
                   f"{message.rpartition(': ')[2] or message}); llama.cpp cannot reconnect, so "
                   "this model is out of service: restart llmserve once the server is back")
        else:
            why = ("llama.cpp hit a fatal error (see the server log); this model is out of "
                   "service until llmserve restarts")
        self.failure = ModelFailed(why, retry_after=30.0)
        self.lost = True
        with self._cond:
            self._stopping = True
            waiting = list(self._pending)
            self._pending.clear()
        # straight to each stream (thread-safe), not through the worker's outbox
        running = [slot.job.stream for slot in self.slots if slot.job is not None]
        for stream in [*map(_stream, waiting), *running]:
            stream.push(Finish("error", len(stream.request.prompt_tokens), 0, error=why,
                               cause=self.failure))

    # -- the worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stopping:
                        break
                    calls = list(self._calls)
                    self._calls.clear()
                    admitted, dropped = self._take_pending()
                    if (not calls and not admitted and not dropped
                            and not any(s.job for s in self.slots)):
                        self._cond.wait(timeout=0.5)
                        continue
                for work, future in calls:
                    try:
                        future.set_result(work())
                    except Exception as exc:  # the caller's to handle
                        future.set_exception(exc)
                # Outside the lock: building a sampler (a grammar, the prompt history) must not
                # hold up ``submit`` on the event loop.
                for item in dropped:
                    if isinstance(item, _Job):
                        self._end(item, "cancelled")
                    else:
                        self._refuse(item, "cancelled")
                for slot, item in admitted:
                    if isinstance(item, _Job):
                        self._resume(slot, item)
                    else:
                        self._start(slot, item)
                self._step()
                self._flush(force=not any(s.job for s in self.slots))
        except Exception as exc:
            # A bug or a llama.cpp failure: end every stream rather than hang clients. Recorded,
            # not logged here: the registry logs it once, with its traceback, when it marks the
            # model failed (and reloads it).
            self.failure = exc
        finally:
            with self._cond:
                self._stopping = True
                pending = list(self._pending)
                self._pending.clear()
                calls = list(self._calls)
                self._calls.clear()
            for _work, future in calls:
                future.set_exception(ModelFailed(f"{WORKER_DIED}; retry shortly",
                                                 retry_after=5.0))
            reason: FinishReason = "cancelled" if self.failure is None else "error"
            error = None if self.failure is None else WORKER_DIED
            for item in pending:
                if isinstance(item, _Job):
                    self._end(item, reason, error=error)
                else:
                    self._refuse(item, reason, error=error)
            for slot in self.slots:
                if slot.job:
                    self._finish(slot, reason, error=error)
            self._flush(force=True)

    def _take_pending(
        self,
    ) -> tuple[list[tuple[Slot, GenerationStream | _Job]], list[GenerationStream | _Job]]:
        """Pair waiting requests (FIFO) with free slots while their prompts fit in the context
        beside the running slots' cells, and take out cancelled ones, wherever they wait
        (caller holds the lock). Cancelled slots are freed first, so a request resent after
        its cancelled turn can take that slot back. The head of the queue is never overtaken:
        a big prompt waits for room rather than starve behind smaller ones."""
        if self._free_cancelled():
            self._flush(force=True)  # their Finish must not wait for the next step
        dropped = [item for item in self._pending if _stream(item).cancelled]
        for item in dropped:
            self._pending.remove(item)
        self._yield_to_interactive()
        free = [s for s in self.slots if s.job is None and s.kept_for is None]
        used = sum(len(s.cached) for s in self.slots if s.job is not None)
        running = sum(1 for s in self.slots if s.job is not None)
        admitted: list[tuple[Slot, GenerationStream | _Job]] = []
        while self._pending and free:
            item = self._pending[0]
            forks = len(_stream(item).forks)
            if len(free) < 1 + forks:
                break  # its choices start together: waits until a slot is free for each
            tokens = item.to_read if isinstance(item, _Job) else list(item.request.prompt_tokens)
            donors = self._donors(free)
            slot = choose_slot(free, tokens, donors)
            reuse = max(common_prefix_len(slot.cached, tokens), longest_prefix(donors, tokens)[1],
                        item.n_parked if isinstance(item, _Job) else 0)
            need = len(tokens) - reuse + 1
            if running and used + need > self.model.n_ctx:
                break  # waits for a running slot to finish (or be preempted)
            self._pending.popleft()
            free.remove(slot)
            admitted.append((slot, item))
            used += len(tokens)
            running += 1
            for kept in sorted(free, key=lambda s: s.last_used)[:forks]:
                free.remove(kept)
                kept.kept_for = _stream(item)
        return admitted, dropped

    def _first_background(self) -> int:
        """Where the background requests start in ``_pending`` (its length if none wait)."""
        return next((i for i, item in enumerate(self._pending)
                     if _stream(item).request.background), len(self._pending))

    def _yield_to_interactive(self) -> None:
        """An interactive request waiting with every slot busy takes the slot of the newest
        background job (a batch line), which goes back behind it with its cells parked, to
        resume later where it stopped: a batch delays a chat by at most the step that frees the
        slot (and that step is not a re-read of a line preempted before: see _park)."""
        if not self._pending or _stream(self._pending[0]).request.background:
            return
        if any(s.job is None for s in self.slots):
            return
        victims = [s for s in self.slots if s.job and s.job.stream.request.background]
        if victims:
            self._preempt(max(victims, key=lambda s: s.job.t_start if s.job else 0.0),
                          "an interactive request needs its slot", park=True)

    def _free_cancelled(self) -> bool:
        """Finish the slots whose stream was cancelled; True if there were any."""
        cancelled = [s for s in self.slots if s.job and s.job.stream.cancelled]
        for slot in cancelled:
            self._finish(slot, "cancelled")
        return bool(cancelled)

    def _donors(self, free: list[Slot]) -> list[Slot]:
        """The slots whose cells a request placed on one of ``free`` may share: the others."""
        if not self._share_prefixes:
            return []
        excluded = {s.seq_id for s in free}
        return [s for s in self.slots if s.seq_id not in excluded]

    def _start(self, slot: Slot, stream: GenerationStream) -> None:
        prompt = list(stream.request.prompt_tokens)
        try:
            adapters = stream.request.lora
            if adapters is None:
                adapters = self.model.lora.global_set()
            else:  # checked when submitted; one may have been unloaded since
                adapters = self.model.lora.request_set(adapters)
        except LlmserveError as exc:  # the request's fault: its client gets this error
            self._refuse(stream, "error", error=exc.message, cause=exc)
            return
        keep = self._claim_prefix(slot, prompt, adapters)
        self._clear_kept(stream)
        slot.job = self._new_job(stream, prompt, keep, adapters)

    def _clear_kept(self, stream: GenerationStream) -> None:
        """Drop the old caches of the slots kept for ``stream``'s forks (after its own prefix
        is claimed: that may share their cells)."""
        for slot in self.slots:
            if slot.kept_for is stream and slot.cached:
                llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
                slot.cached.clear()

    def _release_kept(self, stream: GenerationStream) -> None:
        for slot in self.slots:
            if slot.kept_for is stream:
                slot.kept_for = None

    def _new_job(self, stream: GenerationStream, prompt: list[int], n_cached: int,
                 adapters: AdapterSet) -> _Job | None:
        """A job for ``stream`` whose slot holds the first ``n_cached`` prompt tokens (computed
        under ``adapters``); None (and the stream ended with the error) when its sampler
        cannot be built."""
        try:
            sampler = Sampler(stream.request.sampling, self.model)
        except LlmserveError as exc:  # the request's fault: its client gets this error
            self._refuse(stream, "error", error=exc.message, cause=exc)
            return None
        except Exception as exc:
            log.exception("could not start a generation")
            self._refuse(stream, "error", error=str(exc))
            return None
        sampler.accept_history(prompt)
        return _Job(
            stream=stream,
            prompt=prompt,
            sampler=sampler,
            output=OutputText(stream.request.stop),
            n_cached=n_cached,
            to_read=prompt,
            n_fed=n_cached,
            adapters=adapters,
        )

    def _fork(self, slot: Slot, index: int) -> None:
        """``slot`` has read its prompt: start the choices waiting on it, each on the slot kept
        for it, sharing the prompt's cells and sampling its first token from the same logits
        (batch position ``index``)."""
        job = slot.job
        assert job is not None
        forks, job.stream.forks = job.stream.forks, ()
        kept = [s for s in self.slots if s.kept_for is job.stream]
        self._release_kept(job.stream)
        for stream, target in zip(forks, kept, strict=True):
            if stream.cancelled:
                self._refuse(stream, "cancelled")
                continue
            llama_cpp.llama_memory_seq_rm(self.model.memory, target.seq_id, -1, -1)
            llama_cpp.llama_memory_seq_cp(self.model.memory, slot.seq_id, target.seq_id, 0, -1)
            target.cached[:] = slot.cached
            target.adapters = slot.adapters
            fork = self._new_job(stream, job.prompt, len(job.prompt), job.adapters)
            if fork is None:
                continue
            fork.t_start, fork.t_prompt_done = job.t_start, job.t_prompt_done
            target.job = fork
            self._sample_or_end(target, index)

    def _claim_prefix(self, slot: Slot, tokens: list[int], adapters: AdapterSet) -> int:
        """Make ``slot``'s cache hold the longest prefix of ``tokens`` that any slot holds
        under ``adapters``: its own (trimmed to it), or another slot's cells shared into it;
        return its length."""
        if slot.adapters != adapters:  # cells of another adapter set are no prefix of ours
            llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
            slot.cached.clear()
            slot.adapters = adapters
        donors = [s for s in self._donors([slot]) if s.adapters == adapters]
        donor, shared = longest_prefix(donors, tokens)
        keep = min(shared, len(tokens) - 1)  # the last token is decoded again for its logits
        if (donor is None or keep <= common_prefix_len(slot.cached, tokens)
                or keep < MIN_REUSE_FRACTION * len(tokens)):
            # a shared BOS token or two is not worth tying two sequences' cells together
            return self._keep_prefix(slot, tokens)
        llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_cp(self.model.memory, donor.seq_id, slot.seq_id, 0, keep)
        slot.cached[:] = tokens[:keep]
        return keep

    def _keep_prefix(self, slot: Slot, tokens: list[int]) -> int:
        """Trim ``slot``'s cache to its longest prefix shared with ``tokens`` (less the last
        token, whose logits are needed); return how many cached tokens stay."""
        keep = common_prefix_len(slot.cached, tokens)
        if keep == len(tokens):
            keep -= 1  # the last token must be decoded again to get its logits
        if keep < len(slot.cached) and not llama_cpp.llama_memory_seq_rm(
            self.model.memory, slot.seq_id, keep, -1
        ):
            # Some caches (recurrent models) cannot drop a tail: start the sequence over.
            llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
            keep = 0
        del slot.cached[keep:]
        return keep

    def _resume(self, slot: Slot, job: _Job) -> None:
        """A preempted job takes a slot again: it gets back its parked cells or re-reads what
        it had (its sampler, stop-string state and output so far are kept), then samples on
        from where it stopped."""
        if job.parked is not None:
            job.n_fed = self._unpark(slot, job)
        else:
            job.n_fed = self._claim_prefix(slot, job.to_read, job.adapters)
        self._clear_kept(job.stream)
        slot.job = job

    def _park(self, slot: Slot) -> None:
        """Keep the cells of ``slot``'s job, which is being preempted, under a spare sequence
        id, if one is free: when it resumes they move to its new slot, so it reads nothing
        again. Re-reading would cost a step as long as a prompt read (measured: the step a
        chat waits behind was the resumed line's ~35-token re-read, and a chat sent after
        another preempted a line that had just resumed). Moving cells between sequence ids
        only relabels them in the unified KV cache."""
        job = slot.job
        assert job is not None
        spare = next((i for i in self._spare_ids if i not in self._parked), None)
        if spare is None or not slot.cached:
            return
        llama_cpp.llama_memory_seq_cp(self.model.memory, slot.seq_id, spare, 0, -1)
        self._parked[spare] = job
        job.parked = spare
        # the slot holds to_read's first tokens: all but the last sampled one, which is fed
        # on resuming, or during a prompt read those read so far
        job.n_parked = len(slot.cached)

    def _unpark(self, slot: Slot, job: _Job) -> int:
        """Move ``job``'s parked cells into ``slot`` (in place of its cache); return how many
        of ``to_read`` they hold."""
        assert job.parked is not None
        memory = self.model.memory
        llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_cp(memory, job.parked, slot.seq_id, 0, -1)
        slot.cached[:] = job.to_read[:job.n_parked]
        slot.adapters = job.adapters
        n = job.n_parked
        self._drop_parked(job)
        return n

    def _drop_parked(self, job: _Job) -> None:
        """Free ``job``'s parked cells (it resumes by re-reading, or it ended)."""
        if job.parked is None:
            return
        llama_cpp.llama_memory_seq_rm(self.model.memory, job.parked, -1, -1)
        del self._parked[job.parked]
        job.parked = None
        job.n_parked = 0

    def _preempt(self, slot: Slot, why: str, *, park: bool = False) -> None:
        """Free ``slot``'s cells and put its job back at the head of the queue (a background
        job: at the head of the background ones), to re-read its prompt and generated tokens
        when there is room again; with ``park``, to take its cells back instead where they
        can be kept (see _park)."""
        job = slot.job
        assert job is not None
        if job.next_token is not None:
            # everything sampled so far, including the token not yet fed
            job.to_read = job.prompt + job.generated
            job.next_token = None
        job.n_fed = 0
        self._release_kept(job.stream)  # taken again when it resumes
        if park:
            self._park(slot)
        llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
        slot.cached.clear()
        slot.job = None
        slot.last_used = time.perf_counter()
        log.log(
            logging.INFO if job.stream.request.background else logging.WARNING,
            "%s: preempted a request after %d generated tokens; it resumes when a slot frees "
            "(--ctx-size %d is shared by --parallel %d slots)",
            why, job.n_generated, self.model.n_ctx, len(self.slots),
        )
        with self._cond:
            if job.stream.request.background:
                self._pending.insert(self._first_background(), job)
            else:
                self._pending.appendleft(job)

    def _should_abort(self, _data: Any) -> bool:
        jobs = self._abortable
        return bool(jobs) and all(j.stream.cancelled for j in jobs)

    def _step(self) -> None:
        self._free_cancelled()
        self._free_retired_adapters()
        active = self._adapter_group([s for s in self.slots if s.job])
        if not active:
            return
        if any(s.job and s.job.next_token is None and not s.job.stream.request.background
               for s in active):
            # An interactive prompt is being read: background slots wait out this step, so
            # that neither their tokens nor a batch line's own prompt make it longer (a step's
            # time grows with the tokens in it, and the chat's first token waits for it).
            active = [s for s in active if s.job and not s.job.stream.request.background]

        batch = self._batch
        n = 0
        # (slot, batch index of its logits or -1, tokens fed this step)
        fed: list[tuple[Slot, int, list[int]]] = []
        for slot in active:
            job = slot.job
            assert job is not None
            if job.next_token is not None:
                self._put(n, job.next_token, len(slot.cached), slot.seq_id, True)
                fed.append((slot, n, [job.next_token]))
                n += 1
        budget = prompt_chunk(self.model.n_batch, n)
        reading: list[_Job] = []
        # oldest first, interactive before background: a chat's prompt is not read after a
        # preempted batch line's re-read
        for slot in sorted(active, key=_read_order):
            job = slot.job
            assert job is not None
            if job.next_token is not None or budget <= 0:
                continue
            chunk = job.to_read[job.n_fed : job.n_fed + budget]
            budget -= len(chunk)
            pos = len(slot.cached)
            last = job.n_fed + len(chunk) == len(job.to_read)
            for i, token in enumerate(chunk):
                self._put(n + i, token, pos + i, slot.seq_id, last and i == len(chunk) - 1)
            fed.append((slot, n + len(chunk) - 1 if last else -1, chunk))
            reading.append(job)
            n += len(chunk)
        batch.n_tokens = n

        # llama.cpp calls the abort callback between graph nodes (hundreds per decode), and a
        # Python callback takes the GIL each time: on a short read that costs more than waiting
        # a step (measured: +2-4 ms to a 1-token re-read). So it is set only for reads expected
        # to take longer than ABORT_CHECK_MIN_MS at the prompt speed seen so far.
        n_read = sum(len(tokens) for _slot, _i, tokens in fed) - (len(fed) - len(reading))
        abortable = bool(reading) and (
            self._ms_per_prompt_token is None
            or n_read * self._ms_per_prompt_token > ABORT_CHECK_MIN_MS
        )
        if abortable:
            self._abortable = reading
            llama_cpp.llama_set_abort_callback(self.model.ctx, self._abort_cb, None)
        if reading:
            self._flush(force=True)  # held tokens must not wait through a prompt read
        started = time.perf_counter()
        try:
            rc = llama_cpp.llama_decode(self.model.ctx, batch)
            if rc == 1 and self._drop_idle_caches():
                # No room in the unified KV cache: give up idle slots' caches and try once more.
                rc = llama_cpp.llama_decode(self.model.ctx, batch)
        finally:
            if abortable:
                llama_cpp.llama_set_abort_callback(self.model.ctx, self._no_abort_cb, None)
                self._abortable = []
        if rc == 0 and n_read >= PROMPT_SPEED_MIN_TOKENS:
            per_token = (time.perf_counter() - started) * 1000.0 / n
            previous = self._ms_per_prompt_token
            self._ms_per_prompt_token = (
                per_token if previous is None else 0.5 * previous + 0.5 * per_token
            )

        if rc != 0:
            self._decode_failed(rc, fed)
            running = [s for s in self.slots if s.job]
            if rc == 1 and len(running) > 1:
                # Still no room: the running slots fill the context between them. The newest
                # waits for the others instead of failing (a background one first, also one
                # that sat this step out); the rest go on next step.
                victims = [s for s in running if s.job and s.job.stream.request.background]
                self._preempt(max(victims or running,
                                  key=lambda s: s.job.t_start if s.job else 0.0),
                              "context full")
            elif rc == 1:
                self._finish(active[0], "error",
                             error="the context is full: the request does not fit in it")
            return

        now = time.perf_counter()
        for slot, index, tokens in fed:
            job = slot.job
            assert job is not None
            slot.cached.extend(tokens)
            if job.next_token is None:
                job.n_fed += len(tokens)
            if index < 0:
                continue
            if not job.t_prompt_done:
                job.t_prompt_done = now
            if job.stream.forks:
                self._fork(slot, index)
            self._sample_or_end(slot, index)

    def _sample_or_end(self, slot: Slot, index: int) -> None:
        try:
            self._sample(slot, index)
        except LlmserveError as exc:  # its constraints left no token: the client's error
            log.info("generation ended on a client error: %s", exc.message)
            if slot.job:
                self._finish(slot, "error", error=exc.message, cause=exc)
        except Exception as exc:  # one request's sampler failing must not stop the others
            log.exception("sampling failed")
            if slot.job:
                self._finish(slot, "error", error=str(exc))

    def _adapter_group(self, active: list[Slot]) -> list[Slot]:
        """The running slots this step decodes: all of them when they share one adapter set,
        else those of the next set in turn (the context switched to it)."""
        groups: dict[AdapterSet, list[Slot]] = {}
        for slot in sorted(active, key=lambda s: s.job.t_start if s.job else 0.0):
            assert slot.job is not None
            groups.setdefault(slot.job.adapters, []).append(slot)
        if not groups:
            return []
        sets = list(groups)
        chosen = sets[self._turn % len(sets)]
        self._turn += 1
        self.model.lora.apply(self.model.ctx, chosen)
        if len(sets) == 1:
            return active
        return [s for s in active if s.job is not None and s.job.adapters == chosen]

    def _free_retired_adapters(self) -> None:
        """Free unloaded adapters no running or preempted generation still uses; drop the
        caches computed with them."""
        retired = self.model.lora.retired()
        if not retired:
            return
        with self._cond:
            waiting = [item for item in self._pending if isinstance(item, _Job)]
        jobs = [s.job for s in self.slots if s.job] + waiting
        in_use = {i for job in jobs for i, _ in job.adapters}
        for slot in self.slots:
            if slot.job is None and any(i in retired for i, _ in slot.adapters):
                llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
                slot.cached.clear()
                slot.adapters = ()
        self.model.lora.free_unused(in_use, self.model.ctx)

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits

    def _sample(self, slot: Slot, index: int) -> None:
        job = slot.job
        assert job is not None
        request = job.stream.request
        token = job.sampler.sample(self.model.ctx, index)
        if self.model.is_eog(token) and not request.sampling.ignore_eos:
            self._finish(slot, "stop")
            return
        job.n_generated += 1
        job.generated.append(token)
        text = job.output.push(self.model.token_to_piece(token))
        if request.n_probs > 0:
            logprob, top = self._logprobs(index, token, request.n_probs)
            self._emit(job.stream, TokenEvent(token, text, logprob, top),
                       urgent=job.n_generated == 1)
        else:
            self._emit(job.stream, TokenEvent(token, text), urgent=job.n_generated == 1)
        if job.output.stop_word is not None:
            self._finish(slot, "stop")
        elif job.n_generated >= request.max_tokens or len(slot.cached) >= self.model.n_ctx:
            self._finish(slot, "length")
        else:
            job.next_token = token

    def _logprobs(
        self, index: int, token: int, n: int
    ) -> tuple[float, tuple[tuple[int, float], ...]]:
        """log p of ``token`` and the ``n`` most likely tokens: a log-softmax of the raw logits
        of batch position ``index`` (llama-server's n_probs does the same)."""
        ptr = llama_cpp.llama_get_logits_ith(self.model.ctx, index)
        logits = np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).astype(np.float64)
        peak = logits.max()
        log_z = peak + np.log(np.exp(logits - peak).sum())
        n = min(n, self.model.n_vocab)
        top = np.argpartition(logits, -n)[-n:]
        top = top[np.argsort(-logits[top], kind="stable")]
        return (
            float(logits[token] - log_z),
            tuple((int(t), float(logits[t] - log_z)) for t in top),
        )

    def _finish(self, slot: Slot, reason: FinishReason, *, error: str | None = None,
                cause: LlmserveError | None = None) -> None:
        job = slot.job
        assert job is not None
        slot.job = None
        slot.last_used = time.perf_counter()
        self._end(job, reason, error=error, cause=cause)

    def _end(self, job: _Job, reason: FinishReason, *, error: str | None = None,
             cause: LlmserveError | None = None) -> None:
        job.sampler.free()
        self._drop_parked(job)
        self._refuse_forks(job.stream, reason, error=error, cause=cause)
        if reason in ("stop", "length"):
            rest = job.output.flush()
            if rest:
                self._emit(job.stream, TokenEvent(-1, rest))
        now = time.perf_counter()
        prompt_done = job.t_prompt_done or now
        self._emit(
            job.stream,
            Finish(
                reason=reason,
                prompt_tokens=len(job.prompt),
                completion_tokens=job.n_generated,
                cached_tokens=job.n_cached,
                stop_word=job.output.stop_word,
                timings=Timings(
                    prompt_n=len(job.prompt) - job.n_cached,
                    prompt_ms=(prompt_done - job.t_start) * 1000.0,
                    predicted_n=job.n_generated,
                    predicted_ms=(now - prompt_done) * 1000.0,
                    cache_n=job.n_cached,
                ),
                error=error,
                cause=cause,
            )
        )

    def _refuse(self, stream: GenerationStream, reason: FinishReason, *,
                error: str | None = None, cause: LlmserveError | None = None) -> None:
        """End a stream that never started (and the choices forked from it)."""
        self._emit(stream, Finish(reason, len(stream.request.prompt_tokens), 0, error=error,
                                  cause=cause))
        self._refuse_forks(stream, reason, error=error, cause=cause)

    def _refuse_forks(self, stream: GenerationStream, reason: FinishReason, *,
                      error: str | None = None, cause: LlmserveError | None = None) -> None:
        """``stream`` ended before its prompt was read: so do the choices waiting on it."""
        for fork in stream.forks:
            self._emit(fork, Finish(reason, len(fork.request.prompt_tokens), 0, error=error,
                                    cause=cause))
        stream.forks = ()
        self._release_kept(stream)

    def _emit(self, stream: GenerationStream, event: Event, *, urgent: bool = True) -> None:
        self._outbox.append((stream, event))
        self._urgent = self._urgent or urgent

    def _flush(self, *, force: bool = False) -> None:
        """Hand the outbox to the event loop: at once for anything urgent (a first token, a
        finish), else at most every STREAM_FLUSH_S, so a fast stream wakes the loop (and the
        socket) once per few tokens rather than per token."""
        if not self._outbox:
            return
        now = time.perf_counter()
        if not (force or self._urgent or now - self._last_flush >= STREAM_FLUSH_S):
            return
        events, self._outbox = self._outbox, []
        self._urgent = False
        self._last_flush = now
        GenerationStream.push_all(events)

    def _drop_idle_caches(self) -> bool:
        """Free the cells idle slots keep as prompt caches, and those parked for preempted
        jobs (which then re-read on resuming); False when there were none."""
        dropped = bool(self._parked)
        for job in list(self._parked.values()):
            self._drop_parked(job)
        for slot in self.slots:
            if slot.job is None and slot.cached:
                llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
                slot.cached.clear()
                dropped = True
        return dropped

    def _decode_failed(self, rc: int, fed: list[tuple[Slot, int, list[int]]]) -> None:
        """After an abort or a failure, drop whatever this batch may have left in the cache."""
        for slot, _index, _tokens in fed:
            llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, len(slot.cached), -1)
        if rc == 2:
            # Aborted because every slot reading a prompt was cancelled. The generating slots in
            # the same batch were not: their tokens are fed again next step.
            for slot, _index, _tokens in fed:
                if slot.job and slot.job.stream.cancelled:
                    self._finish(slot, "cancelled")
            return
        if rc == 1:
            return  # no room: the caller preempts
        message = f"llama_decode failed (code {rc})"
        log.error("%s", message)
        for slot, _index, _tokens in fed:
            if slot.job:
                self._finish(slot, "error", error=message)


def _read_order(slot: Slot) -> tuple[bool, float]:
    job = slot.job
    return (job.stream.request.background, job.t_start) if job else (False, 0.0)


def _stream(item: GenerationStream | _Job) -> GenerationStream:
    return item.stream if isinstance(item, _Job) else item
