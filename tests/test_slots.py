"""Slot choice and the --parallel limit (tier 1), and a long prompt read between other slots'
tokens on the real model (tier 3, in process)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# Slot choice and the --parallel check live in the engine, which imports llama_cpp.
pytest.importorskip("llama_cpp")

from llmserve.engine.model import MIN_CTX_PER_SLOT, check_parallel
from llmserve.engine.scheduler import PROMPT_CHUNK_WHILE_GENERATING, Slot, choose_slot
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


@contextlib.asynccontextmanager
async def loaded_engine(model: Path, **options: Any) -> AsyncIterator[Engine]:
    """The real engine on ``model``, loaded and closed off the event loop."""
    from llmserve.engine.engine import Engine

    engine = await asyncio.to_thread(Engine.load, model, **options)
    try:
        yield engine
    finally:
        await asyncio.to_thread(engine.close)


def slot(seq_id: int, cached: list[int], last_used: float) -> Slot:
    return Slot(seq_id, cached=cached, last_used=last_used)


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
