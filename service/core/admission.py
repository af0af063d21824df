"""Admission control: a bound on items admitted for the backend and not yet answered."""

from __future__ import annotations

from service.errors import Overloaded
from service.metrics import Metrics


class Admission:
    """Counts admitted items; past `limit`, new work is refused at once (RESOURCE_EXHAUSTED).

    The batching queue reads `admitted` too: items admitted but not yet queued are still
    being decoded or tokenized, and are worth holding a batch open for.
    """

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.admitted = 0
        self._metrics = metrics

    def admit(self, n: int) -> None:
        """Take `n` places or raise Overloaded without taking any."""
        if self.admitted + n > self.limit:
            self._metrics.rejected_items.inc(n)
            raise Overloaded(
                f"server busy: {self.admitted} items queued, limit {self.limit}; retry with backoff"
            )
        self.admitted += n
        self._metrics.queued_items.set(self.admitted)

    def release(self, n: int) -> None:
        """Give back `n` places (answered, failed or abandoned)."""
        self.admitted -= n
        self._metrics.queued_items.set(self.admitted)
