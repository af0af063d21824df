"""The batching queue of the embedded backend: concurrent calls → one forward pass.

Each entry holds its rows, a future for the answer and its arrival time. One owner
task pops entries of the head's kind and shape until the batch is full or the wait is
over, runs the batch on the model thread, and hands each entry its slice. While a
batch runs, new entries pile up and form the next one. Entries whose caller is gone
are skipped; a failed batch fails every entry in it, and only those.

A fixed short wait alone splits steady load into alternating tiny and big batches
(measured 2, 30, 2, 30 with 32 callers): when a batch finishes, its callers' next
items are still being decoded while the first one to arrive runs nearly alone. So
while admitted items are still on their way (admission count > rows queued and
running), the batch is held open longer: at most a quarter of the last forward
pass, which bounds the latency this can add.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.core.admission import Admission
from service.metrics import Metrics

_LOGGER = logging.getLogger(__name__)
# Share of the last forward pass's duration a batch may be held open for arrivals.
_HOLD_FRACTION = 0.25

RunBatch = Callable[[str, np.ndarray], np.ndarray]


@dataclass
class _Entry:
    kind: str
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def group(self) -> Hashable:
        # Only same-kind, same-shape rows can be stacked into one tensor.
        return (self.kind, self.rows.shape[1:])


class BatchQueue:
    """Merges `submit` calls of the same kind and shape into batches of ≤ max_batch_size."""

    def __init__(
        self,
        run_batch: RunBatch,
        executor: Executor,
        *,
        max_batch_size: int,
        max_wait_s: float,
        metrics: Metrics,
        admission: Admission | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._metrics = metrics
        self._admission = admission
        self._rows_running = 0
        self._last_forward_s = 0.0
        self._entries: deque[_Entry] = deque()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self.batches_run = 0

    def start(self) -> None:
        """Start the owner task on the running loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._loop(), name="batch-queue")

    async def aclose(self) -> None:
        """Stop the owner task; entries still queued fail as cancelled."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._entries:
            entry = self._entries.popleft()
            if not entry.future.done():
                entry.future.cancel()

    async def submit(self, kind: str, rows: np.ndarray) -> np.ndarray:
        """Queue `rows` (≤ max_batch_size of them) and wait for their outputs."""
        if len(rows) > self.max_batch_size:
            raise ValueError(f"{len(rows)} rows is more than max_batch_size {self.max_batch_size}")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._entries.append(_Entry(kind, rows, future))
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[_Entry]:
        while not self._entries:
            self._wakeup.clear()
            await self._wakeup.wait()
        started = time.perf_counter()
        deadline = started + self._max_wait_s
        hold_until = started + max(self._max_wait_s, _HOLD_FRACTION * self._last_forward_s)
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
        if self._admission is None:
            return 0
        queued = sum(len(e.rows) for e in self._entries if not e.future.done())
        return self._admission.admitted - queued - self._rows_running

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
            fits = size + len(entry.rows) <= self.max_batch_size
            if entry.group == head.group and fits and not entry.future.done():
                batch.append(entry)
                size += len(entry.rows)
            elif not entry.future.done():
                kept.append(entry)  # other shapes, and what did not fit, keep their order
        self._entries = kept
        return batch

    async def _run(self, batch: list[_Entry]) -> None:
        kind = batch[0].kind
        rows = np.concatenate([e.rows for e in batch]) if len(batch) > 1 else batch[0].rows
        now = time.perf_counter()
        for entry in batch:
            self._metrics.queue_wait.labels(kind).observe(now - entry.enqueued)
        self._metrics.batch_size.labels(kind).observe(len(rows))
        loop = asyncio.get_running_loop()
        self._rows_running = len(rows)
        forward_started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_batch, kind, rows)
        except Exception as exc:
            _LOGGER.exception("batch of %d %s rows failed", len(rows), kind)
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
            return
        finally:
            self._rows_running = 0
            self._last_forward_s = time.perf_counter() - forward_started
        self.batches_run += 1
        start = 0
        for entry in batch:
            end = start + len(entry.rows)
            if not entry.future.done():
                entry.future.set_result(outputs[start:end])
            start = end
