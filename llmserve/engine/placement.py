"""The scheduler's admission decisions as plain data: which slot a request takes, whose cached
prefix it starts from, and how much of a prompt one step reads. Nothing here imports llama_cpp,
so the rules are tested without a model (tests/test_slots.py); ``scheduler.py`` applies them.

A slot is anything with ``cached`` (the tokens whose KV cells it holds, in position order) and
``last_used``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

# A free slot's own cache is reused only when it covers at least this share of the new prompt;
# otherwise the least recently used slot is taken, so a long cached chat is not thrown away
# for a shared BOS token (llama-server's --slot-prompt-similarity, default 0.1).
MIN_REUSE_FRACTION = 0.1
# While another slot generates, a step reads at most this many prompt tokens, so one long
# prompt delays each running stream's next token by a short decode, not a full n_batch one.
PROMPT_CHUNK_WHILE_GENERATING = 128


class CachedSlot(Protocol):
    @property
    def cached(self) -> list[int]: ...

    @property
    def last_used(self) -> float: ...


S = TypeVar("S", bound=CachedSlot)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def longest_prefix(slots: Iterable[S], prompt: Sequence[int]) -> tuple[S | None, int]:
    """The slot whose cache shares the longest prefix with ``prompt`` (the first such), and
    that length; (None, 0) when none shares a token."""
    best: S | None = None
    shared = 0
    for slot in slots:
        n = common_prefix_len(slot.cached, prompt)
        if n > shared:
            best, shared = slot, n
    return best, shared


def choose_slot(free: Sequence[S], prompt: Sequence[int], others: Iterable[S] = ()) -> S:
    """The free slot ``prompt`` goes to.

    The free slot whose own cache shares the longest prefix with ``prompt`` (ties: the least
    recently used) when that prefix is at least MIN_REUSE_FRACTION of the prompt and no slot in
    ``others`` (busy slots, whose cells the request can share) holds a longer one. Otherwise the
    least recently used free slot: its cache is either useless to this prompt or about to be
    replaced by the longer prefix shared from another slot, and the better-matching free caches
    stay for the requests they fit.
    """
    own = max(free, key=lambda s: (common_prefix_len(s.cached, prompt), -s.last_used))
    shared = common_prefix_len(own.cached, prompt)
    _, elsewhere = longest_prefix(others, prompt)
    if shared and shared >= elsewhere and shared >= MIN_REUSE_FRACTION * len(prompt):
        return own
    return min(free, key=lambda s: s.last_used)


def prompt_chunk(n_batch: int, n_generating: int) -> int:
    """How many prompt tokens one step may read beside ``n_generating`` slots' next tokens.

    Alone, the whole batch: llama.cpp reads a prompt fastest in big batches (a 1,566-token prompt
    on the 2-core CPU: ~163 tokens/s in 512-token chunks, ~118 in 128-token ones). While others
    stream, PROMPT_CHUNK_WHILE_GENERATING, so their tokens keep flowing between the chunks.
    """
    room = n_batch - n_generating
    return min(room, PROMPT_CHUNK_WHILE_GENERATING) if n_generating else room
