"""The gateway's batching queue: concurrent calls → one backend call, for every backend.

Contract:
- `submit(modality, rows)` returns exactly the backend's outputs for `rows`, in order,
  or raises the error of the batch they ran in (a failed batch fails its entries only).
- Entries of one modality and row shape are merged, head first, up to `max_batch_size()`
  rows; the head entry always runs, even past a limit that shrank after it was queued.
- At most `max_inflight` batches run at once; entries whose caller is gone are skipped.
- Priority lanes (`service.core.lanes`): a batch holds entries of one lane. The next
  batch is formed from the oldest interactive entry, unless the oldest bulk entry has
  waited `bulk_max_wait_s` or more (then it goes first: bulk is never starved, and under
  interactive overload bulk still gets a batch every `bulk_max_wait_s`) or no interactive
  work waits. An interactive call therefore waits at most for the batches already
  running, never for queued bulk work. Each batch runs in its lane's context, so the
  backend sees the lane (Triton: the request's priority level).
- The queue imports nothing from its callers: what it needs to know about arrivals
  (`admitted(lane)`: rows taken in but not yet answered) and limits is injected.

Why the hold: a fixed short wait alone splits steady load into alternating tiny and big
batches (when a batch finishes, its callers' next items are still being decoded while
the first to arrive runs nearly alone). So while admitted rows are still on their way
(admitted > rows queued and running), a batch is held open, at most a quarter of the
last batch's duration, which bounds the latency this adds. Closed-loop callers once
split would stay split, so a backlog that queued while a batch ran waits a tenth of
that batch for the callers just answered, and the halves merge again. Triton's dynamic
batcher cannot do this: it does not know what the gateway is still decoding. The
measurements behind this are in bench/README.md ("Batching").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace

from service.core import lanes
from service.errors import ClipError
from service.metrics import Metrics
from service.telemetry import NO_TRACER

_LOGGER = logging.getLogger(__name__)
# Share of the last batch's duration a batch may be held open for arrivals.
_HOLD_FRACTION = 0.25
# Share of it a backlog waits for the callers the last batch just answered to come back.
_LINGER_FRACTION = 0.1
#: Default age past which a bulk entry goes before interactive work (`bulk_max_wait_s`).
DEFAULT_BULK_MAX_WAIT_S = 1.0

#: Runs one batch: (modality, rows, timeout in seconds or None) → outputs, one row per input.
RunBatch = Callable[[str, np.ndarray, float | None], Awaitable[np.ndarray]]


@dataclass
class _Entry:
    modality: str
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    #: `time.perf_counter()` after which the caller no longer waits; None = no deadline.
    deadline: float | None = None
    lane: lanes.Lane = lanes.INTERACTIVE
    #: The caller's trace context, and its `queue.wait` span (ended when its batch starts).
    context: otel_context.Context | None = None
    span: trace.Span = trace.INVALID_SPAN
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def group(self) -> Hashable:
        # Only same-modality, same-shape rows can be stacked into one tensor, and a batch
        # keeps to one lane (an interactive batch topped up with bulk rows would be slower).
        return (self.modality, self.rows.shape[1:], self.lane)


def _trace_home(batch: list[_Entry]) -> otel_context.Context | None:
    """The context a batch's `backend` span (and Triton's spans under it) goes in: the
    first entry that came inside a trace, a caller's, rather than an untraced one (a
    health probe's forward pass), so a traced call merged behind one still has its
    backend and Triton spans in its own trace."""
    for entry in batch:
        if entry.context is not None and (
            trace.get_current_span(entry.context).get_span_context().is_valid
        ):
            return entry.context
    return batch[0].context


class BatchQueue:
    """Merges `submit` calls of the same modality and shape into batches of ≤ max_batch_size."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: Callable[[], int],
        max_wait_s: float,
        metrics: Metrics,
        admitted: Callable[[lanes.Lane], int] | None = None,
        max_inflight: int = 1,
        bulk_max_wait_s: float = DEFAULT_BULK_MAX_WAIT_S,
        tracer: trace.Tracer = NO_TRACER,
    ) -> None:
        """`max_batch_size` is asked before each batch (a Triton model's limit is learnt late);
        `admitted(lane)` counts rows of `lane` taken in upstream and not yet answered (None:
        no hold); `bulk_max_wait_s`: the age at which bulk work goes before interactive."""
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, not {max_inflight}")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._metrics = metrics
        self._admitted = admitted
        self._slots = asyncio.Semaphore(max_inflight)
        self._bulk_max_wait_s = bulk_max_wait_s
        self._tracer = tracer
        self._rows_running: dict[str, int] = dict.fromkeys(lanes.LANES, 0)
        self._last_batch_s = 0.0
        self._entries: deque[_Entry] = deque()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.batches_run = 0

    @property
    def max_batch_size(self) -> int:
        """Most rows one batch may hold now."""
        return self._max_batch_size()

    def start(self) -> None:
        """Start the owner task on the running loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._loop(), name="batch-queue")

    async def aclose(self) -> None:
        """Stop the owner task and running batches; entries still queued fail as cancelled."""
        tasks = [t for t in (self._worker, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._worker = None
        while self._entries:
            entry = self._entries.popleft()
            if not entry.future.done():
                entry.future.cancel()

    async def submit(
        self,
        modality: str,
        rows: np.ndarray,
        timeout_s: float | None = None,
        lane: lanes.Lane | None = None,
    ) -> np.ndarray:
        """Queue `rows` (≤ max_batch_size of them) in `lane` (None: the caller's) and wait
        for their outputs.

        `timeout_s` bounds the backend call of the batch this lands in (the longest
        wait among its entries); the caller enforces its own deadline around this.
        """
        if len(rows) > self.max_batch_size:
            raise ValueError(f"{len(rows)} rows is more than max_batch_size {self.max_batch_size}")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        lane = lane or lanes.current()
        span = self._tracer.start_span(
            "queue.wait",
            attributes={"clip.modality": modality, "clip.items": len(rows), "clip.lane": lane},
        )
        entry = _Entry(modality, rows, future, deadline, lane, otel_context.get_current(), span)
        self._entries.append(entry)
        self._wakeup.set()
        try:
            return await future
        finally:
            if span.is_recording():
                span.end()  # its caller left before the batch started

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[_Entry]:
        # Entries already here queued while the last batch ran: its callers come back next.
        backlog = bool(self._entries)
        while not self._entries:
            self._wakeup.clear()
            await self._wakeup.wait()
        started = time.perf_counter()
        linger = _LINGER_FRACTION * self._last_batch_s if backlog else 0.0
        deadline = started + max(self._max_wait_s, linger)
        hold_until = started + max(self._max_wait_s, _HOLD_FRACTION * self._last_batch_s)
        while self._count_head_group() < self.max_batch_size:
            now = time.perf_counter()
            until = hold_until if self._arriving() > 0 else deadline
            if now >= until:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), until - now)
            except TimeoutError:
                if self._arriving() == 0 or time.perf_counter() >= hold_until:
                    break
        return self._take_head_group()

    def _arriving(self) -> int:
        """Admitted rows of the head's lane not yet queued nor running: still being decoded
        or tokenized (bulk rows on their way are no reason to hold an interactive batch)."""
        head = self._live_head()
        if self._admitted is None or head is None:
            return 0
        lane = head.lane
        queued = sum(len(e.rows) for e in self._entries if e.lane == lane and not e.future.done())
        return self._admitted(lane) - queued - self._rows_running[lane]

    def _live_head(self) -> _Entry | None:
        """The entry the next batch is formed around: the oldest interactive one, unless the
        oldest bulk one has waited `bulk_max_wait_s` (or no interactive one waits)."""
        while self._entries and self._entries[0].future.done():
            self._entries.popleft()  # the caller cancelled or timed out
        interactive = bulk = None
        for entry in self._entries:
            if entry.future.done():
                continue
            if entry.lane == lanes.BULK:
                bulk = bulk or entry
            else:
                interactive = interactive or entry
            if interactive is not None and bulk is not None:
                break
        if bulk is not None and (
            interactive is None or time.perf_counter() - bulk.enqueued >= self._bulk_max_wait_s
        ):
            return bulk
        return interactive

    def _count_head_group(self) -> int:
        head = self._live_head()
        if head is None:
            return 0
        return sum(len(e.rows) for e in self._entries if e.group == head.group)

    def _take_head_group(self) -> list[_Entry]:
        head = self._live_head()
        if head is None:
            return []
        batch: list[_Entry] = []
        kept: deque[_Entry] = deque()
        size = 0
        for entry in self._entries:
            # The head always goes, even past a limit that shrank after it was queued
            # (Triton's, read late): else it would block the queue; the backend splits it.
            fits = not batch or size + len(entry.rows) <= self.max_batch_size
            if entry.group == head.group and fits and not entry.future.done():
                batch.append(entry)
                size += len(entry.rows)
            elif not entry.future.done():
                kept.append(entry)  # other shapes, and what did not fit, keep their order
        self._entries = kept
        return batch

    async def _run(self, batch: list[_Entry]) -> None:
        modality, lane = batch[0].modality, batch[0].lane
        rows = np.concatenate([e.rows for e in batch]) if len(batch) > 1 else batch[0].rows
        now = time.perf_counter()
        for entry in batch:
            if entry.span.is_recording():
                entry.span.end()
            self._metrics.queue_wait.labels(modality).observe(now - entry.enqueued)
            self._metrics.lane_queue_wait.labels(lane).observe(now - entry.enqueued)
        self._metrics.batch_size.labels(modality).observe(len(rows))
        self._metrics.lane_batches.labels(lane).inc()
        deadlines = [e.deadline for e in batch if e.deadline is not None]
        # The batch serves its most patient caller; the others stop waiting on their own.
        timeout_s = max(deadlines) - now if len(deadlines) == len(batch) else None
        self._rows_running[lane] += len(rows)
        started = time.perf_counter()
        # One span per batch, in the trace of its first traced caller, linked to every entry.
        backend_span = self._tracer.start_span(
            "backend",
            context=_trace_home(batch),
            links=[trace.Link(e.span.get_span_context()) for e in batch],
            attributes={
                "clip.modality": modality,
                "clip.lane": lane,
                "clip.batch_size": len(rows),
                "clip.entries": len(batch),
            },
        )
        try:
            # The backend call sees the batch's lane and span (Triton: priority, traceparent).
            with lanes.using(lane), trace.use_span(backend_span, end_on_exit=True):
                outputs = await self._run_batch(modality, rows, timeout_s)
        except asyncio.CancelledError:
            for entry in batch:
                entry.future.cancel()  # the queue is closing: nobody is left waiting
            raise
        except Exception as exc:
            # Backend errors (Triton down, a deadline) are counted and logged by the backend
            # once per outage; a line per failed batch would flood the log during one.
            log = _LOGGER.debug if isinstance(exc, ClipError) else _LOGGER.exception
            log("batch of %d %s rows failed: %s", len(rows), modality, exc)
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
            return
        finally:
            self._rows_running[lane] -= len(rows)
            self._last_batch_s = time.perf_counter() - started
            self._slots.release()
        self.batches_run += 1
        start = 0
        for entry in batch:
            end = start + len(entry.rows)
            if not entry.future.done():
                entry.future.set_result(outputs[start:end])
            start = end
