"""Per-client token buckets (``--rate-limit 60/minute --rate-burst 10``).

A client is its API key when keys are configured, else its IP address. Each bucket holds up to
``burst`` requests and refills at ``requests / period`` per second; a request takes one. Runs on
the event loop only, so no locks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmserve.errors import RateLimited

# Above this many tracked clients, buckets that have refilled completely are forgotten (a full
# bucket is the same as a new one), so the table cannot grow without bound.
_PRUNE_ABOVE = 10_000


@dataclass(frozen=True)
class RateLimit:
    requests: float
    period: float
    burst: int

    @property
    def per_second(self) -> float:
        return self.requests / self.period

    def describe(self) -> str:
        return f"{self.requests:g} requests per {self.period:g} s, burst {self.burst}"


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True)
class Allowance:
    """What the X-RateLimit-* headers say after a request was let through."""

    limit: int
    remaining: int
    reset: float


class RateLimiter:
    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, client: str) -> Allowance:
        """Take one request from ``client``'s bucket, or raise RateLimited (429)."""
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_ABOVE:
                self._prune(now)
            bucket = self._buckets[client] = _Bucket(float(self.limit.burst), now)
        else:
            bucket.tokens = min(float(self.limit.burst),
                                bucket.tokens + (now - bucket.updated) * self.limit.per_second)
            bucket.updated = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / self.limit.per_second
            raise RateLimited(
                f"rate limit exceeded ({self.limit.describe()}); retry in {math.ceil(wait)} s",
                retry_after=wait, limit=self.limit.burst, remaining=0,
                reset=self._until_full(bucket),
            )
        bucket.tokens -= 1.0
        return Allowance(self.limit.burst, int(bucket.tokens), self._until_full(bucket))

    def _until_full(self, bucket: _Bucket) -> float:
        return (self.limit.burst - bucket.tokens) / self.limit.per_second

    def _prune(self, now: float) -> None:
        full_after = self.limit.burst / self.limit.per_second
        for client in [c for c, b in self._buckets.items() if now - b.updated >= full_after]:
            del self._buckets[client]
