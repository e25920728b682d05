"""The scheduler's forked choices (OpenAI ``n``) in process on the real model (tier 3): one
prompt read, a slot per choice kept until it is read, and ends that reach every choice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from llmserve.engine.types import (
    Finish,
    GenerationRequest,
    GenerationStream,
    SamplingParams,
    TokenEvent,
)
from tests.test_slots import loaded_engine

pytestmark = pytest.mark.real

GREEDY = SamplingParams(temperature=0, ignore_eos=True)


async def drain(stream: GenerationStream, log: list[str] | None = None, name: str = ""
                ) -> tuple[list[int], Finish]:
    tokens: list[int] = []
    async for event in stream:
        if isinstance(event, Finish):
            if log is not None:
                log.append(f"{name} finish")
            return tokens, event
        if isinstance(event, TokenEvent) and event.token_id >= 0:
            if log is not None and not tokens:
                log.append(f"{name} first token")
            tokens.append(event.token_id)
    raise AssertionError("no Finish")


async def test_choices_read_the_prompt_once_and_start_alike(demo_model: Path) -> None:
    async with loaded_engine(demo_model, n_ctx=1024, n_parallel=3) as engine:
        prompt = engine.tokenize("The quick brown fox jumps over the lazy dog. " * 3)
        request = GenerationRequest(prompt_tokens=prompt, max_tokens=4, sampling=GREEDY)
        streams = engine.submit_choices([request] * 3)
        results = await asyncio.wait_for(asyncio.gather(*map(drain, streams)), timeout=110)
        (first_tokens, first), *others = results
        assert first.timings.prompt_n == len(prompt) and first.cached_tokens == 0
        for tokens, finish in others:
            assert finish.reason == "length"
            assert finish.timings.prompt_n == 0 and finish.cached_tokens == len(prompt)
            assert tokens == first_tokens
        assert engine.busy_slots == 0


async def test_ending_the_first_choice_before_its_prompt_is_read_ends_them_all(
    demo_model: Path,
) -> None:
    async with loaded_engine(demo_model, n_ctx=2048, n_parallel=3) as engine:
        long_prompt = engine.tokenize("Note: the red fox walked to the river. " * 120)
        streams = engine.submit_choices(
            [GenerationRequest(prompt_tokens=long_prompt, max_tokens=4, sampling=GREEDY)] * 3)
        streams[0].cancel()
        engine.scheduler.wake()
        results = await asyncio.wait_for(asyncio.gather(*map(drain, streams)), timeout=110)
        assert [f.reason for _t, f in results] == ["cancelled"] * 3
        assert all(f.completion_tokens == 0 for _t, f in results)
        # the slots kept for the forks are free again: another group of three runs
        again = engine.submit_choices(
            [GenerationRequest(prompt_tokens=engine.tokenize("Hi"), max_tokens=2,
                               sampling=GREEDY)] * 3)
        done = await asyncio.wait_for(asyncio.gather(*map(drain, again)), timeout=110)
        assert [f.reason for _t, f in done] == ["length"] * 3


async def test_a_group_waits_until_a_slot_is_free_for_each_choice(demo_model: Path) -> None:
    async with loaded_engine(demo_model, n_ctx=1024, n_parallel=3) as engine:
        log: list[str] = []
        busy = engine.submit(GenerationRequest(prompt_tokens=engine.tokenize("Count: 1, 2,"),
                                               max_tokens=12, sampling=GREEDY))
        busy_done = asyncio.ensure_future(drain(busy, log, "single"))
        async with asyncio.timeout(60):
            while engine.busy_slots == 0:
                await asyncio.sleep(0.01)
        group = engine.submit_choices(
            [GenerationRequest(prompt_tokens=engine.tokenize("Letters: a, b,"), max_tokens=3,
                               sampling=GREEDY)] * 3)
        results = await asyncio.wait_for(
            asyncio.gather(*(drain(s, log, f"choice {i}") for i, s in enumerate(group))),
            timeout=110)
        await asyncio.wait_for(busy_done, timeout=110)
        assert all(f.reason == "length" for _t, f in results)
        # two slots were free all along, but the three choices start together, after it
        assert log.index("single finish") < log.index("choice 0 first token")
