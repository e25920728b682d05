"""Background requests (batch lines) against interactive ones in the scheduler, on the real
engine in process (tier 3): a chat that finds every slot busy takes a line's slot at once, the
line's cells are parked and it resumes without reading anything again; a step that reads the
chat's prompt holds no background token; parked cells give way when the context fills (the
line then re-reads); a parked line that is cancelled frees its cells. Every check counts what
llama_decode was given, never how long anything took."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# the scheduler drives llama.cpp itself
pytest.importorskip("llama_cpp")

import llama_cpp

from llmserve.engine.types import Finish, GenerationRequest, GenerationStream, SamplingParams
from tests.test_slots import _drain, loaded_engine

if TYPE_CHECKING:
    from llmserve.engine.engine import Engine

GREEDY = SamplingParams(temperature=0, ignore_eos=True)


@dataclass(frozen=True)
class Decode:
    """One llama_decode call as the scheduler made it."""

    tokens: list[int]
    seq_ids: set[int]
    # every sequence's first position in the batch follows the last cell it holds: nothing
    # it had was lost (a parked line's cells included) and nothing is read twice over it
    contiguous: bool
    # llama_decode's result (1: no room in the KV cache; the scheduler makes room, tries again)
    rc: int


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Decode]]:
    """Every llama_decode call made while the test runs (the worker thread's too)."""
    seen: list[Decode] = []
    real = llama_cpp.llama_decode

    def record(ctx: Any, batch: Any) -> int:
        memory = llama_cpp.llama_get_memory(ctx)
        n = batch.n_tokens
        first: dict[int, int] = {}
        for i in range(n):
            first.setdefault(batch.seq_id[i][0], batch.pos[i])
        contiguous = all(llama_cpp.llama_memory_seq_pos_max(memory, seq) + 1 == pos
                         for seq, pos in first.items())
        tokens = [batch.token[i] for i in range(n)]
        rc = int(real(ctx, batch))
        seen.append(Decode(tokens, set(first), contiguous, rc))
        return rc

    monkeypatch.setattr(llama_cpp, "llama_decode", record)
    yield seen


def submit(engine: Engine, text: str | list[int], max_tokens: int, *,
           background: bool = False) -> GenerationStream:
    tokens = engine.tokenize(text) if isinstance(text, str) else text
    return engine.submit(GenerationRequest(prompt_tokens=tokens, max_tokens=max_tokens,
                                           sampling=GREEDY, background=background))


async def until_generating(engine: Engine, n: int) -> None:
    """Poll (with a deadline) until ``n`` slots have sampled a token."""
    async with asyncio.timeout(120):
        while sum(s.n_decoded > 0 for s in engine.slot_states()) < n:
            await asyncio.sleep(0.01)


async def until_first_token(stream: GenerationStream) -> asyncio.Future[tuple[int, Finish]]:
    """Wait for ``stream``'s first token; the rest drains in the returned future."""
    events = stream.__aiter__()
    async with asyncio.timeout(120):
        await anext(events)

    async def rest() -> tuple[int, Finish]:
        tokens, finish = await _drain(stream)
        return tokens + 1, finish

    return asyncio.ensure_future(rest())


def decoded(decodes: list[Decode]) -> int:
    """Tokens the KV cache took in (a decode that found no room took none)."""
    return sum(len(d.tokens) for d in decodes if d.rc == 0)


def fed(finish: Finish) -> int:
    """Tokens a generation gives llama_decode when it reads nothing twice: the prompt less its
    cached prefix, and every sampled token but the last."""
    return finish.timings.prompt_n + finish.completion_tokens - 1


def spare_ids_empty(engine: Engine) -> bool:
    model = engine.scheduler.model
    return all(llama_cpp.llama_memory_seq_pos_max(model.memory, seq) == -1
               for seq in range(model.n_parallel, model.n_seq_max))


@pytest.mark.real
async def test_a_chat_takes_a_batch_lines_slot_and_the_line_resumes_without_reading_again(
    demo_model: Path, decodes: list[Decode],
) -> None:
    async with loaded_engine(demo_model, n_ctx=2048, n_parallel=2) as engine:
        assert engine.scheduler.model.n_seq_max == 4  # a spare sequence id per slot
        lines = [submit(engine, text, 300, background=True)
                 for text in ("Count: 1, 2, 3,", "List the letters: a, b, c,")]
        line_done = [asyncio.ensure_future(_drain(s)) for s in lines]
        await until_generating(engine, 2)
        chat_prompt = engine.tokenize("Say hello to the reader, please.")
        chat = submit(engine, chat_prompt, 8)
        chat_tokens, chat_finish = await asyncio.wait_for(_drain(chat), timeout=120)
        # both slots were busy with 300-token lines: it did not wait for one to finish
        assert not any(done.done() for done in line_done)
        results = await asyncio.wait_for(asyncio.gather(*line_done), timeout=300)
        assert spare_ids_empty(engine)

    assert chat_finish.reason == "length" and chat_tokens == chat_finish.completion_tokens == 8
    for tokens, finish in results:
        assert finish.reason == "length" and finish.completion_tokens == 300
        assert tokens >= 299  # one event per token (a held-back piece may merge two)
    # the chat's prompt was read in a step of its own, without a background token
    assert chat_prompt[chat_finish.cached_tokens:] in [d.tokens for d in decodes]
    # the preempted line took its cells back: no token was read twice, none lost
    assert decoded(decodes) == sum(
        fed(f) for f in (chat_finish, *(finish for _, finish in results)))
    assert all(d.contiguous for d in decodes)


@pytest.mark.real
async def test_parked_cells_give_way_when_the_context_fills_and_the_line_reads_again(
    demo_model: Path, decodes: list[Decode],
) -> None:
    """512 cells: a 240-token line parked for a chat, another line and the chat outgrow what
    is left; the parked cells are dropped rather than anything failing, and the line re-reads
    its prompt and tokens when it resumes."""
    async with loaded_engine(demo_model, n_ctx=512, n_parallel=2) as engine:
        long_prompt = engine.tokenize("The history of the sea. " * 80)[:240]
        short = submit(engine, "Count: 1, 2, 3,", 240, background=True)
        long = submit(engine, long_prompt, 16, background=True)
        line_done = [asyncio.ensure_future(_drain(s)) for s in (short, long)]
        await until_generating(engine, 2)
        chat = submit(engine, "Say hello to the reader, please.", 240)
        _, chat_finish = await asyncio.wait_for(_drain(chat), timeout=300)
        results = await asyncio.wait_for(asyncio.gather(*line_done), timeout=300)
        assert spare_ids_empty(engine)

    assert chat_finish.reason == "length" and chat_finish.completion_tokens == 240
    assert [finish.completion_tokens for _, finish in results] == [240, 16]
    assert all(finish.reason == "length" for _, finish in results)
    assert all(d.contiguous for d in decodes)
    # more than a run without re-reads: the long line read its cells again
    assert decoded(decodes) > sum(
        fed(f) for f in (chat_finish, *(finish for _, finish in results)))


@pytest.mark.real
async def test_a_parked_line_that_is_cancelled_frees_its_cells(
    demo_model: Path, decodes: list[Decode],
) -> None:
    async with loaded_engine(demo_model, n_ctx=2048, n_parallel=2) as engine:
        lines = [submit(engine, text, 200, background=True)
                 for text in ("Count: 1, 2, 3,", "List the letters: a, b, c,")]
        line_done = [asyncio.ensure_future(_drain(s)) for s in lines]
        await until_generating(engine, 2)
        chat = submit(engine, "Say hello to the reader, please.", 64)
        chat_rest = await until_first_token(chat)
        # the chat holds the newest line's slot until it ends: that line waits, parked
        assert engine.scheduler.preempted == 1
        lines[1].cancel()
        _, chat_finish = await asyncio.wait_for(chat_rest, timeout=120)
        (_, kept), (_, cancelled) = await asyncio.wait_for(asyncio.gather(*line_done),
                                                           timeout=300)
        assert spare_ids_empty(engine)

    assert chat_finish.reason == "length"
    assert kept.reason == "length" and kept.completion_tokens == 200
    assert cancelled.reason == "cancelled" and 0 < cancelled.completion_tokens < 200
    assert all(d.contiguous for d in decodes)
