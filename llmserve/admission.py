"""A bounded waiting room in front of the engine: reserve a place or be refused at once.

Capacity is ``parallel`` running + ``max_queue`` waiting. The decision is made before any
templating or tokenising, so an overloaded server spends nothing on work it will refuse.
Everything here runs on the event loop; no locks are needed.
"""

from __future__ import annotations

from llmserve.errors import ServerBusy


class Ticket:
    """One admitted request. ``release`` is idempotent: call it in every ``finally``."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission._in_system -= 1
            self._admission = None


class Admission:
    def __init__(self, *, parallel: int, max_queue: int, retry_after: float = 1.0) -> None:
        self.parallel = parallel
        self.max_queue = max_queue
        self.retry_after = retry_after
        self._in_system = 0

    @property
    def capacity(self) -> int:
        return self.parallel + self.max_queue

    @property
    def in_system(self) -> int:
        return self._in_system

    @property
    def waiting(self) -> int:
        return max(0, self._in_system - self.parallel)

    def reserve(self) -> Ticket:
        if self._in_system >= self.capacity:
            raise ServerBusy(
                f"the server is busy: {self.parallel} running and {self.max_queue} waiting "
                "(--max-queue); retry shortly",
                retry_after=self.retry_after,
            )
        self._in_system += 1
        return Ticket(self)
