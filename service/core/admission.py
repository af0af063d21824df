"""Admission control: bounds on work taken in and not yet done.

`Admission` bounds items admitted for the backend (the event loop's side; past it,
RESOURCE_EXHAUSTED at once). `PixelBudget` bounds the pixels being decoded at once
(the decode threads' side; past it, a decode waits for others to finish). `ByteBudget`
bounds the bytes of requests being handled (past it, RESOURCE_EXHAUSTED at once).

Together they weigh work by what it costs where it is spent: request bytes while held,
pixels while decoding, and items in the backend, where every image is the same S×S tensor
and texts are padded to a few length buckets.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from prometheus_client import Gauge

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


class PixelBudget:
    """Pixels decoded at once, across threads: `hold(n)` waits until `n` fit.

    A canvas larger than the whole budget is held as the whole budget (it runs alone
    rather than never), so the peak is about max(limit, the largest canvas).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the pixel budget must be at least 1, not {limit}")
        self.limit = limit
        self.in_use = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Block until `pixels` fit in the budget, keep them for the `with` block."""
        weight = max(1, min(pixels, self.limit))
        with self._changed:
            self._changed.wait_for(lambda: self.in_use + weight <= self.limit)
            self.in_use += weight
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= weight
                self._changed.notify_all()


class ByteBudget:
    """Bytes of requests being handled at once; past `limit`, new ones are refused at once.

    A request larger than the whole budget is still taken when nothing else is held (it
    runs alone rather than never), so the peak is about max(limit, the largest message).
    Single-threaded (the event loop): no lock.
    """

    def __init__(self, limit: int, gauge: Gauge) -> None:
        if limit < 1:
            raise ValueError(f"the request byte budget must be at least 1, not {limit}")
        self.limit = limit
        self.in_use = 0
        self._gauge = gauge

    def take(self, n: int) -> None:
        """Hold `n` bytes or raise Overloaded without holding any."""
        if self.in_use and self.in_use + n > self.limit:
            raise Overloaded(
                f"server busy: {self.in_use} bytes of requests in flight, limit {self.limit} "
                f"(--max-inflight-request-bytes); this one has {n}; retry with backoff"
            )
        self.in_use += n
        self._gauge.set(self.in_use)

    def give(self, n: int) -> None:
        """Release `n` bytes taken before."""
        self.in_use -= n
        self._gauge.set(self.in_use)

    @contextlib.contextmanager
    def held(self, n: int) -> Iterator[None]:
        """`n` bytes held for the `with` block (Overloaded, holding none, past the limit)."""
        self.take(n)
        try:
            yield
        finally:
            self.give(n)
