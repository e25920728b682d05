"""Slot choice and the --parallel limit (tier 1), and a long prompt read between other slots'
tokens on the real model (tier 3, in process)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmserve.engine.model import MIN_CTX_PER_SLOT, check_parallel
from llmserve.engine.scheduler import PROMPT_CHUNK_WHILE_GENERATING, Slot, choose_slot
from llmserve.engine.types import GenerationRequest, SamplingParams, TokenEvent
from llmserve.errors import InvalidRequest


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
    from llmserve.engine.engine import Engine

    engine = await asyncio.to_thread(Engine.load, demo_model, n_ctx=2048, n_parallel=2)
    try:
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
    finally:
        await asyncio.to_thread(engine.close)
