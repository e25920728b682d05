"""Slot choice, prompt chunks and the --parallel limit (tier 1); on the real model (tier 3), a
long prompt read between other slots' tokens, preemption, and a prompt resent after its turn
was cancelled finding its cache (in process, and over HTTP as a client does it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

# Slot choice and the --parallel check live in the engine, which imports llama_cpp.
pytest.importorskip("llama_cpp")

from llmserve.engine.model import MIN_CTX_PER_SLOT, check_parallel
from llmserve.engine.placement import (
    PROMPT_CHUNK_WHILE_GENERATING,
    choose_slot,
    longest_prefix,
    prompt_chunk,
)
from llmserve.engine.types import (
    Finish,
    GenerationRequest,
    GenerationStream,
    SamplingParams,
    TokenEvent,
)
from llmserve.errors import InvalidRequest

if TYPE_CHECKING:
    from llmserve.engine.engine import Engine
    from tests.conftest import ServerProcess


@contextlib.asynccontextmanager
async def loaded_engine(model: Path, **options: Any) -> AsyncIterator[Engine]:
    """The real engine on ``model``, loaded and closed off the event loop; one thread unless
    told otherwise (the CPU is shared: with a thread per core, llama.cpp's threads wait on
    each other whenever another process runs, measured 14x slower under load)."""
    from llmserve.engine.engine import Engine

    engine = await asyncio.to_thread(Engine.load, model, **{"n_threads": 1, **options})
    try:
        yield engine
    finally:
        await asyncio.to_thread(engine.close)


@dataclass
class Slot:
    """What placement reads of a scheduler slot."""

    seq_id: int
    cached: list[int]
    last_used: float


def slot(seq_id: int, cached: list[int], last_used: float) -> Slot:
    return Slot(seq_id, cached, last_used)


def test_the_slot_with_the_longest_shared_prefix_wins() -> None:
    a, b = slot(0, [1, 2, 3, 4], 5.0), slot(1, [1, 2, 9], 1.0)
    assert choose_slot([a, b], [1, 2, 3, 4, 5]) is a
    assert choose_slot([a, b], [1, 2, 9, 9]) is b


def test_a_token_or_two_in_common_does_not_evict_a_cached_chat() -> None:
    chat = slot(0, list(range(1, 200)), 5.0)
    empty = slot(1, [], 0.0)
    # shares only its first token with the cached chat: take the idle, empty slot
    assert choose_slot([chat, empty], [1, *range(500, 600)]) is empty


def test_ties_go_to_the_least_recently_used() -> None:
    old, recent = slot(0, [7, 8], 1.0), slot(1, [7, 8], 9.0)
    assert choose_slot([recent, old], [7, 8, 9]) is old
    assert choose_slot([recent, old], [5, 6]) is old


HISTORY = list(range(1, 1501))


def test_a_turn_resent_after_a_cancel_takes_the_slot_that_holds_its_history() -> None:
    # the cancelled turn's slot was freed a moment ago (most recently used); the other is cold
    cancelled = slot(0, [*HISTORY, 9001, 9002], last_used=10.0)
    cold = slot(1, [], last_used=1.0)
    assert choose_slot([cancelled, cold], [*HISTORY, 7, 8, 9]) is cancelled


def test_a_prefix_held_by_a_busy_slot_sends_the_request_to_the_least_recently_used_free_one(
) -> None:
    # the previous turn still streams (its client's disconnect not seen yet): the request can
    # share those cells, so the free slot whose own cache is worth least is given up for them
    streaming = slot(0, [*HISTORY, 9001], last_used=10.0)
    other_chat = slot(1, [*HISTORY[:300], 5, 5, 5], last_used=5.0)
    stale = slot(2, [4, 4, 4], last_used=1.0)
    prompt = [*HISTORY, 7, 8]
    assert choose_slot([other_chat, stale], prompt, [streaming]) is stale
    assert longest_prefix([other_chat, streaming, stale], prompt) == (streaming, len(HISTORY))


def test_a_free_slot_with_the_longest_prefix_keeps_it_over_a_busy_one() -> None:
    busy = slot(0, HISTORY[:800], last_used=10.0)
    own = slot(1, HISTORY, last_used=5.0)
    cold = slot(2, [], last_used=1.0)
    assert choose_slot([own, cold], [*HISTORY, 7], [busy]) is own


def test_longest_prefix_of_nothing_shared() -> None:
    assert longest_prefix([slot(0, [1, 2], 0.0), slot(1, [], 0.0)], [3, 4]) == (None, 0)
    assert longest_prefix([], [3, 4]) == (None, 0)


@pytest.mark.parametrize(
    ("n_batch", "n_generating", "chunk"),
    [(512, 0, 512), (2048, 0, 2048), (512, 1, PROMPT_CHUNK_WHILE_GENERATING),
     (512, 8, PROMPT_CHUNK_WHILE_GENERATING), (64, 1, 63)],
    ids=["alone", "alone-big-batch", "beside-one-stream", "beside-eight", "small-batch"],
)
def test_a_prompt_is_read_in_whole_batches_alone_and_in_small_chunks_beside_streams(
    n_batch: int, n_generating: int, chunk: int,
) -> None:
    assert prompt_chunk(n_batch, n_generating) == chunk


@pytest.mark.parametrize(
    ("parallel", "n_ctx"), [(1, 64), (1, 256), (4, 4 * MIN_CTX_PER_SLOT), (8, 4096)]
)
def test_parallel_within_the_context_is_allowed(parallel: int, n_ctx: int) -> None:
    check_parallel(parallel, n_ctx)


@pytest.mark.parametrize(("parallel", "n_ctx"), [(0, 4096), (2, 256), (8, 1024), (64, 4096)])
def test_parallel_beyond_the_context_is_refused(parallel: int, n_ctx: int) -> None:
    with pytest.raises(InvalidRequest) as exc:
        check_parallel(parallel, n_ctx)
    assert exc.value.param == "parallel"


@pytest.mark.real
async def test_a_long_prompt_is_read_between_the_tokens_of_a_running_stream(
    demo_model: Path,
) -> None:
    async with loaded_engine(demo_model, n_ctx=2048, n_parallel=2) as engine:
        greedy = SamplingParams(temperature=0, ignore_eos=True)
        running = engine.submit(GenerationRequest(
            prompt_tokens=engine.tokenize("Count: 1, 2, 3,"), max_tokens=400, sampling=greedy))
        events = running.__aiter__()
        for _ in range(2):  # it is generating
            assert isinstance(await anext(events), TokenEvent)
        long_prompt = engine.tokenize("The history of the sea. " * 300)[:1500]
        reader = engine.submit(GenerationRequest(prompt_tokens=long_prompt, max_tokens=1,
                                                 sampling=greedy))
        first = asyncio.ensure_future(anext(reader.__aiter__()))
        tokens_meanwhile = 0
        while not first.done():
            step = asyncio.ensure_future(anext(events))
            await asyncio.wait({first, step}, return_when=asyncio.FIRST_COMPLETED)
            if step.done():
                assert isinstance(step.result(), TokenEvent)
                tokens_meanwhile += 1
            else:
                step.cancel()
        # 1500 prompt tokens in chunks of PROMPT_CHUNK_WHILE_GENERATING, one token of the
        # running stream per chunk
        assert tokens_meanwhile >= 1500 // PROMPT_CHUNK_WHILE_GENERATING - 2, tokens_meanwhile
        running.cancel()


async def _drain(stream: GenerationStream) -> tuple[int, Finish]:
    """(token events seen, the Finish) of one generation."""
    tokens = 0
    async for event in stream:
        if isinstance(event, Finish):
            return tokens, event
        tokens += 1
    raise AssertionError("no Finish")


@pytest.mark.real
async def test_slots_that_outgrow_the_shared_context_are_preempted_not_cut_short(
    demo_model: Path,
) -> None:
    """Two slots of 400 tokens each cannot both fit in a 512-token context: the newer one is
    preempted, waits, re-reads what it had and finishes in full after the older one."""
    async with loaded_engine(demo_model, n_ctx=512, n_parallel=2) as engine:
        greedy = SamplingParams(temperature=0, ignore_eos=True)
        streams = [
            engine.submit(GenerationRequest(prompt_tokens=engine.tokenize(text), max_tokens=400,
                                            sampling=greedy))
            for text in ("Count: 1, 2, 3,", "List the letters: a, b, c,")
        ]
        drained = asyncio.gather(*map(_drain, streams))
        async with asyncio.timeout(60):
            while engine.scheduler.preempted == 0:
                await asyncio.sleep(0.01)
        results = await asyncio.wait_for(drained, timeout=90)
        for tokens, finish in results:
            assert finish.reason == "length"
            assert finish.completion_tokens == 400
            assert tokens >= 399  # one event per token (a held-back piece may merge two)
        assert engine.scheduler.queued == 0
        assert engine.busy_slots == 0


@pytest.mark.real
async def test_a_preempted_request_whose_client_leaves_is_dropped_from_the_queue(
    demo_model: Path,
) -> None:
    async with loaded_engine(demo_model, n_ctx=512, n_parallel=2) as engine:
        greedy = SamplingParams(temperature=0, ignore_eos=True)
        older = engine.submit(GenerationRequest(
            prompt_tokens=engine.tokenize("Count: 1, 2, 3,"), max_tokens=450, sampling=greedy))
        newer = engine.submit(GenerationRequest(
            prompt_tokens=engine.tokenize("Letters: a, b, c,"), max_tokens=400,
            sampling=greedy))
        older_done = asyncio.ensure_future(_drain(older))
        async with asyncio.timeout(60):
            while engine.scheduler.preempted == 0:  # until the newer one is preempted
                await asyncio.sleep(0.01)
        newer.cancel()
        engine.scheduler.wake()
        tokens, finish = await asyncio.wait_for(_drain(newer), timeout=30)
        assert finish.reason == "cancelled"
        assert 0 < finish.completion_tokens < 400
        assert tokens == finish.completion_tokens
        _, older_finish = await asyncio.wait_for(older_done, timeout=60)
        assert older_finish.reason == "length" and older_finish.completion_tokens == 450
        assert engine.scheduler.queued == 0


async def test_push_all_hands_a_step_of_events_over_in_order_from_another_thread() -> None:
    import threading

    loop = asyncio.get_running_loop()
    a = GenerationStream(GenerationRequest(prompt_tokens=[1], max_tokens=2), loop)
    b = GenerationStream(GenerationRequest(prompt_tokens=[1], max_tokens=2), loop)
    events = [(a, TokenEvent(1, "x")), (b, TokenEvent(2, "y")), (a, TokenEvent(3, "z")),
              (b, Finish("stop", 1, 1)), (a, Finish("length", 1, 2))]
    worker = threading.Thread(target=GenerationStream.push_all, args=(events,))
    worker.start()
    worker.join()

    async def seen(stream: GenerationStream) -> list[object]:
        return [e async for e in stream]

    got_a, got_b = await asyncio.wait_for(asyncio.gather(seen(a), seen(b)), timeout=5)
    assert got_a == [e for s, e in events if s is a]
    assert got_b == [e for s, e in events if s is b]


@pytest.mark.real
async def test_cancelling_a_long_prompt_read_aborts_the_decode_midway(demo_model: Path) -> None:
    """llama.cpp's abort callback stops a prompt read between graph nodes: the Finish comes
    long before the chunk being read would have been done."""
    import time

    async with loaded_engine(demo_model, n_ctx=4096) as engine:
        greedy = SamplingParams(temperature=0)
        text = "The history of the sea and of the ships that sailed it. " * 200

        async def read(tokens: list[int]) -> float:
            started = time.perf_counter()
            stream = engine.submit(GenerationRequest(prompt_tokens=tokens, max_tokens=1,
                                                     sampling=greedy))
            await _drain(stream)
            return time.perf_counter() - started

        # one full 512-token batch, timed (it also teaches the scheduler the prompt speed)
        one_batch = await read(engine.tokenize("A " + text)[:512])
        long_prompt = engine.tokenize("B " + text)[:2000]
        stream = engine.submit(GenerationRequest(prompt_tokens=long_prompt, max_tokens=1,
                                                 sampling=greedy))
        await asyncio.sleep(0.03)  # inside the first 512-token chunk
        stream.cancel()
        cancelled_at = time.perf_counter()
        _, finish = await asyncio.wait_for(_drain(stream), timeout=30)
        waited = time.perf_counter() - cancelled_at
        assert finish.reason == "cancelled"
        assert waited < one_batch / 2, (waited, one_batch)
        # the engine is free and reads a new prompt from scratch
        assert await read(engine.tokenize("C short prompt")) < 5


def _field_notes(sentences: int, start: int = 0) -> str:
    """A deterministic text that no other test's prompt starts with (~16 tokens a sentence)."""
    animals = ("fox", "heron", "otter", "badger", "lynx", "crane", "hare", "wolf", "seal")
    places = ("river", "old mill", "north gate", "orchard", "harbour", "quarry", "chapel")
    return " ".join(
        f"Note {i}: the {animals[i * 5 % len(animals)]} walked {i * 37 % 101} steps to the "
        f"{places[i * 7 % len(places)]}." for i in range(start, start + sentences)
    )


async def _first_token(stream: GenerationStream) -> None:
    async with asyncio.timeout(90):
        async for event in stream:
            assert isinstance(event, TokenEvent), event
            return


@pytest.mark.real
async def test_a_prompt_resent_right_after_its_turn_is_cancelled_reuses_that_slot(
    demo_model: Path,
) -> None:
    """Cancel, then submit at once (SillyTavern's Stop then Regenerate): the cancelled slot is
    freed before the new request is placed, so it lands there and reads only its new tokens;
    the other slot is never touched."""
    async with loaded_engine(demo_model, n_ctx=4096, n_parallel=2) as engine:
        greedy = SamplingParams(temperature=0, ignore_eos=True)
        history = engine.tokenize(_field_notes(100))[:1500]
        turn1 = engine.submit(GenerationRequest(prompt_tokens=history, max_tokens=200,
                                                sampling=greedy))
        await _first_token(turn1)
        turn1.cancel()
        more = engine.tokenize(" Which animal walked the most steps?", add_special=False)
        turn2 = engine.submit(GenerationRequest(prompt_tokens=[*history, *more], max_tokens=2,
                                                sampling=greedy))
        _, finish = await asyncio.wait_for(_drain(turn2), timeout=60)
        assert finish.cached_tokens == len(history)
        assert finish.timings.prompt_n == len(more)
        _, cancelled = await asyncio.wait_for(_drain(turn1), timeout=10)
        assert cancelled.reason == "cancelled"
        assert sorted(s.n_cached for s in engine.slot_states())[0] == 0  # one slot unused


@pytest.mark.real
async def test_a_prompt_shares_the_cached_prefix_of_a_slot_still_generating(
    demo_model: Path,
) -> None:
    """The previous turn still streams (its disconnect not seen yet): the new request takes the
    other slot but shares the busy slot's cells for the prefix instead of re-reading it, and
    sees the distribution the same prompt gets when read from scratch. Not bit for bit: the
    shared cells were computed in another batch and sit elsewhere in the cache, which moves
    log-probabilities by ~0.1-0.25 here (module docstring of test_real_samplers); without the
    history, the top log-probability moves by 1.1 and 4 of the top 5 tokens change."""
    probed = SamplingParams(temperature=0)
    async with loaded_engine(demo_model, n_ctx=2048, n_parallel=2) as engine:
        history = engine.tokenize(_field_notes(30))[:400]
        more = engine.tokenize(" Which animal walked the most steps? The", add_special=False)
        running = engine.submit(GenerationRequest(
            prompt_tokens=history, max_tokens=300,
            sampling=SamplingParams(temperature=0, ignore_eos=True)))
        await _first_token(running)
        shared_top, shared = await asyncio.wait_for(_first_top(engine.submit(GenerationRequest(
            prompt_tokens=[*history, *more], max_tokens=1, sampling=probed, n_probs=5))),
            timeout=60)
        assert shared.cached_tokens == len(history)
        assert shared.timings.prompt_n == len(more)
        assert engine.busy_slots == 1  # the first one still runs beside it
        running.cancel()
        engine.scheduler.wake()
        await asyncio.wait_for(_drain(running), timeout=10)
    async with loaded_engine(demo_model, n_ctx=2048) as fresh:
        alone_top, alone = await asyncio.wait_for(_first_top(fresh.submit(GenerationRequest(
            prompt_tokens=[*history, *more], max_tokens=1, sampling=probed, n_probs=5))),
            timeout=60)
        assert alone.cached_tokens == 0
    assert next(iter(shared_top)) == next(iter(alone_top))
    common = shared_top.keys() & alone_top.keys()
    assert len(common) >= 3, (shared_top, alone_top)
    assert max(abs(shared_top[t] - alone_top[t]) for t in common) < 0.5, (shared_top, alone_top)


async def _first_top(stream: GenerationStream) -> tuple[dict[int, float], Finish]:
    """The first token's top log-probabilities (most likely first), and the Finish."""
    top: dict[int, float] = {}
    async for event in stream:
        if isinstance(event, Finish):
            return top, event
        top = top or dict(event.top_logprobs)
    raise AssertionError("no Finish")


def _chat_history(turns: int) -> list[dict[str, str]]:
    """A deterministic chat of ``turns`` user/assistant pairs (~300 tokens each)."""
    messages = [{"role": "system", "content": "You keep field notes."}]
    for turn in range(turns):
        notes = _field_notes(18, start=18 * turn)
        messages += [{"role": "user", "content": f"More observations. {notes}"},
                     {"role": "assistant", "content": f"Recorded part {turn + 1}."}]
    return messages


def _read_chat(response: httpx.Response, started: float, *, stop_after_first: bool,
               ) -> tuple[float, dict[str, Any]]:
    """Read a streamed chat: (seconds from ``started`` to the first content token, the
    ``timings`` and ``usage`` the last chunks carried); with ``stop_after_first``, only up to
    that token."""
    assert response.status_code == 200, response.read()
    ttft: float | None = None
    last: dict[str, Any] = {}
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        choices = chunk.get("choices") or []
        if ttft is None and choices and choices[0]["delta"].get("content"):
            ttft = time.perf_counter() - started
            if stop_after_first:
                break
        last.update((k, chunk[k]) for k in ("timings", "usage") if chunk.get(k))
    assert ttft is not None
    return ttft, last


@pytest.mark.real
@pytest.mark.parametrize("order", ["drop-then-resend", "resend-then-drop"])
def test_a_chat_resent_right_after_its_stream_is_dropped_reads_only_the_new_message(
    start_server: Callable[..., ServerProcess], order: str,
) -> None:
    """Issue 10: with --parallel 2, a ~1,500-token chat streamed, the connection dropped after
    the first content token and the next turn sent at once: it reuses the cached history.
    Dropped first, the cancel is applied before the new turn is placed; resent first (the new
    turn is submitted while the old one still streams), it shares the busy slot's cells."""
    # a context with room for both turns' prompts side by side: a smaller one would make the
    # new turn wait for the old one to end, whatever the slot choice
    server = start_server("--parallel", "2", "--ctx-size", "4096")
    messages = _chat_history(5)
    # each turn ends with a user message (a trailing assistant message would be continued)
    body: dict[str, Any] = {"messages": [*messages, {"role": "user", "content": "Go on."}],
                            "max_tokens": 200, "temperature": 0,
                            "stream": True, "stream_options": {"include_usage": True}}
    resend = {**body, "max_tokens": 2,
              "messages": [*messages, {"role": "user", "content": "Which animal walked most?"}]}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        started = time.perf_counter()
        with client.stream("POST", "/v1/chat/completions", json=body) as turn1:
            first_ttft, _ = _read_chat(turn1, started, stop_after_first=True)
            if order == "drop-then-resend":
                turn1.close()  # the connection goes: llmserve cancels the generation
            started = time.perf_counter()
            # its response head comes back once the request is submitted to the engine
            with client.stream("POST", "/v1/chat/completions", json=resend) as turn2:
                turn1.close()
                second_ttft, last = _read_chat(turn2, started, stop_after_first=False)
    prompt_tokens = last["usage"]["prompt_tokens"]
    assert prompt_tokens > 1400
    cached = last["timings"]["cache_n"]
    assert cached == last["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert last["timings"]["prompt_n"] == prompt_tokens - cached < 40
    # the deterministic check is the cache count above; the time only with a wide margin, as
    # other processes share the CPU (the benchmark measures the ratio: bench/README.md)
    assert second_ttft < first_ttft / 3, (second_ttft, first_ttft)
