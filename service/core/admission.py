"""Admission control: bounds on work taken in and not yet done.

`Admission` bounds items admitted for the backend (the event loop's side; past it,
RESOURCE_EXHAUSTED at once). `PixelBudget` bounds the pixels being decoded at once
(the decode threads' side; past it, a decode waits for others to finish). `ByteBudget`
bounds the bytes of requests being handled (past it, RESOURCE_EXHAUSTED at once).

Together they weigh work by what it costs where it is spent: request bytes while held,
pixels while decoding, and items in the backend, where every image is the same S×S tensor
and texts are padded to a few length buckets.

A refusal says when to come back (`Overloaded.retry_after_s`): the items that must be
answered before the request fits, divided by the rate items were answered lately
(`DrainRate`), clamped to [0.1 s, 30 s]. Clients that wait that long (with jitter) find
room instead of retrying at once into the same full queue.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import Gauge

from service.core import lanes
from service.errors import DEFAULT_RETRY_AFTER_S, Overloaded
from service.metrics import Metrics

#: Bounds of a retry hint: shorter is noise (a batch takes longer), longer is a guess.
MIN_RETRY_AFTER_S = 0.1
MAX_RETRY_AFTER_S = 30.0


class DrainRate:
    """Items answered per second over the last `window_s` (from `record` calls).

    Measured over the window, or over the time since the first record when that is
    shorter, so a fresh gateway's first refusals are not told to wait for ever.
    """

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._window_s = window_s
        self._clock = clock
        self._first: float | None = None
        self._done: deque[tuple[float, int]] = deque()
        self._total = 0

    def record(self, n: int) -> None:
        """`n` items were answered now."""
        now = self._clock()
        if self._first is None:
            self._first = now
        self._done.append((now, n))
        self._total += n
        self._prune(now)

    def per_second(self) -> float | None:
        """Items answered per second lately; None when nothing was answered in the window."""
        now = self._clock()
        self._prune(now)
        if not self._done or self._first is None:
            return None
        span = min(self._window_s, now - self._first)
        # At least one record's worth of time: one burst just now is not an infinite rate.
        return self._total / max(span, MIN_RETRY_AFTER_S)

    def wait_for(self, backlog: int) -> float:
        """Seconds until `backlog` more items are answered at the recent rate (clamped)."""
        rate = self.per_second()
        if rate is None:
            return DEFAULT_RETRY_AFTER_S
        return min(max(backlog / rate, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)

    def _prune(self, now: float) -> None:
        while self._done and self._done[0][0] < now - self._window_s:
            self._total -= self._done.popleft()[1]


class Admission:
    """Counts admitted items per priority lane; past a lane's limit, new work in that lane
    is refused at once (RESOURCE_EXHAUSTED, with a retry hint).

    Each lane has its own bound (`limit` for interactive calls, `bulk_limit` for bulk
    work), so a bulk job that fills its own cannot take the places interactive calls need.
    The batching queue reads `admitted` (both lanes) too: items admitted but not yet
    queued are still being decoded or tokenized, and are worth holding a batch open for.
    """

    def __init__(
        self,
        limit: int,
        metrics: Metrics,
        drain: DrainRate | None = None,
        *,
        bulk_limit: int | None = None,
    ) -> None:
        """`drain`: where answered items are counted (retry hints); a fresh one by default.
        `bulk_limit` None: the same as `limit`."""
        self.limits: dict[str, int] = {
            lanes.INTERACTIVE: limit,
            lanes.BULK: limit if bulk_limit is None else bulk_limit,
        }
        self.by_lane: dict[str, int] = dict.fromkeys(lanes.LANES, 0)
        self._metrics = metrics
        self.drain = drain or DrainRate()

    @property
    def limit(self) -> int:
        """The interactive lane's bound (`--max-queued-items`)."""
        return self.limits[lanes.INTERACTIVE]

    @property
    def admitted(self) -> int:
        """Items admitted and not yet answered, both lanes."""
        return sum(self.by_lane.values())

    def admit(self, n: int, lane: lanes.Lane | None = None) -> None:
        """Take `n` places in `lane` (None: the call's) or raise Overloaded (with a retry
        hint) without taking any."""
        lane = lane or lanes.current()
        limit, admitted = self.limits[lane], self.by_lane[lane]
        if admitted + n > limit:
            self._metrics.rejected_items.inc(n)
            self._metrics.lane_rejected_items.labels(lane).inc(n)
            name = "items" if lane == lanes.INTERACTIVE else "bulk items"
            if n > limit:  # waiting will never make room for it: no retry hint
                raise Overloaded(
                    f"server busy: {n} {name} is more than the {limit} the queue holds; "
                    "split the request",
                    retry_after_s=None,
                )
            # Answers needed before this request fits.
            retry_after_s = self.drain.wait_for(admitted + n - limit)
            raise Overloaded(
                f"server busy: {admitted} {name} queued, limit {limit}; "
                f"retry in {retry_after_s:.1f} s",
                retry_after_s=retry_after_s,
            )
        self.by_lane[lane] = admitted + n
        self._published(lane)

    def release(self, n: int, *, answered: bool = True, lane: lanes.Lane | None = None) -> None:
        """Give back `n` places of `lane` (None: the call's); `answered` False when they
        failed or were abandoned (they are not counted as drained)."""
        lane = lane or lanes.current()
        self.by_lane[lane] -= n
        self._published(lane)
        if answered:
            self.drain.record(n)

    def _published(self, lane: str) -> None:
        self._metrics.queued_items.set(self.admitted)
        self._metrics.lane_queued_items.labels(lane).set(self.by_lane[lane])


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
