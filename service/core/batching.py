"""The gateway's batching queue: concurrent calls → one backend call, for every backend.

Contract:
- `submit(modality, rows)` returns exactly the backend's outputs for `rows`, in order,
  or raises the error of the batch they ran in (a failed batch fails its entries only).
- Entries of one modality and row shape are merged, head first, up to `max_batch_size()`
  rows; the head entry always runs, even past a limit that shrank after it was queued.
- At most `max_inflight` batches run at once; entries whose caller is gone are skipped.
- The queue imports nothing from its callers: what it needs to know about arrivals
  (`admitted()`: rows taken in but not yet answered) and limits is injected.

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

from service.errors import ClipError
from service.metrics import Metrics

_LOGGER = logging.getLogger(__name__)
# Share of the last batch's duration a batch may be held open for arrivals.
_HOLD_FRACTION = 0.25
# Share of it a backlog waits for the callers the last batch just answered to come back.
_LINGER_FRACTION = 0.1

#: Runs one batch: (modality, rows, timeout in seconds or None) → outputs, one row per input.
RunBatch = Callable[[str, np.ndarray, float | None], Awaitable[np.ndarray]]


@dataclass
class _Entry:
    modality: str
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    #: `time.perf_counter()` after which the caller no longer waits; None = no deadline.
    deadline: float | None = None
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def group(self) -> Hashable:
        # Only same-modality, same-shape rows can be stacked into one tensor.
        return (self.modality, self.rows.shape[1:])


class BatchQueue:
    """Merges `submit` calls of the same modality and shape into batches of ≤ max_batch_size."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: Callable[[], int],
        max_wait_s: float,
        metrics: Metrics,
        admitted: Callable[[], int] | None = None,
        max_inflight: int = 1,
    ) -> None:
        """`max_batch_size` is asked before each batch (a Triton model's limit is learnt late);
        `admitted` counts rows taken in upstream and not yet answered (None: no hold)."""
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, not {max_inflight}")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._metrics = metrics
        self._admitted = admitted
        self._slots = asyncio.Semaphore(max_inflight)
        self._rows_running = 0
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
        self, modality: str, rows: np.ndarray, timeout_s: float | None = None
    ) -> np.ndarray:
        """Queue `rows` (≤ max_batch_size of them) and wait for their outputs.

        `timeout_s` bounds the backend call of the batch this lands in (the longest
        wait among its entries); the caller enforces its own deadline around this.
        """
        if len(rows) > self.max_batch_size:
            raise ValueError(f"{len(rows)} rows is more than max_batch_size {self.max_batch_size}")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        self._entries.append(_Entry(modality, rows, future, deadline))
        self._wakeup.set()
        return await future

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
        """Admitted rows not yet queued nor running: still being decoded or tokenized."""
        if self._admitted is None:
            return 0
        queued = sum(len(e.rows) for e in self._entries if not e.future.done())
        return self._admitted() - queued - self._rows_running

    def _live_head(self) -> _Entry | None:
        while self._entries and self._entries[0].future.done():
            self._entries.popleft()  # the caller cancelled or timed out
        return self._entries[0] if self._entries else None

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
        modality = batch[0].modality
        rows = np.concatenate([e.rows for e in batch]) if len(batch) > 1 else batch[0].rows
        now = time.perf_counter()
        for entry in batch:
            self._metrics.queue_wait.labels(modality).observe(now - entry.enqueued)
        self._metrics.batch_size.labels(modality).observe(len(rows))
        deadlines = [e.deadline for e in batch if e.deadline is not None]
        # The batch serves its most patient caller; the others stop waiting on their own.
        timeout_s = max(deadlines) - now if len(deadlines) == len(batch) else None
        self._rows_running += len(rows)
        started = time.perf_counter()
        try:
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
            self._rows_running -= len(rows)
            self._last_batch_s = time.perf_counter() - started
            self._slots.release()
        self.batches_run += 1
        start = 0
        for entry in batch:
            end = start + len(entry.rows)
            if not entry.future.done():
                entry.future.set_result(outputs[start:end])
            start = end
