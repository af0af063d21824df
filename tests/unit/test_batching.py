"""The batching queue: merging, shapes kept apart, holding a batch open for arrivals.

No test here races a window. The hold and linger windows are fractions of the last
batch's duration, which these tests set to 400 s: a window never closes during a test,
however slow the machine, and the test ends as soon as the batch is full. Later
arrivals come `LATER_S` after the first, long past the 2 ms short wait; asyncio fires
timers in order, so a queue that did not hold would have sent its batch first.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.core.admission import Admission
from service.core.batched_backend import BatchedBackend
from service.core.batching import BatchQueue
from service.errors import BackendFailure, DeadlineExceeded
from service.metrics import Metrics

LONG_LAST_BATCH_S = 400.0  # hold window 100 s, linger 40 s: never reached in a test
LATER_S = 0.05  # 25 short waits (2 ms): a queue that does not hold has gone by then
# Bounds that only end a broken test: what they bound takes milliseconds (or, when
# broken, the 100 s hold), and a loaded machine is slower by far less than this.
PATIENT_S = 30.0


def _queue(
    admission: Admission | None, last_batch_s: float = 0.0, **options: object
) -> tuple[BatchQueue, list]:
    sizes: list[tuple[str, int, tuple[int, ...]]] = []

    async def run(kind: str, rows: np.ndarray, timeout_s: float | None) -> np.ndarray:
        sizes.append((kind, len(rows), rows.shape[1:]))
        return rows.reshape(len(rows), -1)[:, :1].astype(np.float32)

    queue = BatchQueue(
        run,
        max_batch_size=lambda: 8,
        max_wait_s=0.002,
        metrics=Metrics(),
        admitted=None if admission is None else (lambda lane: admission.by_lane[lane]),
        **options,  # type: ignore[arg-type]
    )
    queue._last_batch_s = last_batch_s
    return queue, sizes


async def _later(queue: BatchQueue, first: int, n: int) -> list[np.ndarray]:
    """`n` single-row submits, of rows `first`..., `LATER_S` from now."""
    await asyncio.sleep(LATER_S)
    return await asyncio.gather(
        *(
            queue.submit("image", np.full((1, 3), i, dtype=np.int64))
            for i in range(first, first + n)
        )
    )


async def _turns(n: int = 100) -> None:
    """Let ready callbacks run `n` times (no clock involved)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_holds_the_batch_open_while_admitted_items_are_on_their_way() -> None:
    admission = Admission(100, Metrics())
    admission.admit(8)  # 8 items admitted; 7 of them still "decoding"
    queue, sizes = _queue(admission, last_batch_s=LONG_LAST_BATCH_S)
    queue.start()
    first = asyncio.ensure_future(queue.submit("image", np.full((1, 3), 0, dtype=np.int64)))
    later = await _later(queue, 1, 7)
    assert sizes == [("image", 8, (3,))]  # not [1, 7]: the first waited for the others
    answers = [await first, *later]
    assert [int(a[0, 0]) for a in answers] == list(range(8))  # each caller gets its own row
    await queue.aclose()


async def test_without_arrivals_a_batch_goes_after_the_short_wait() -> None:
    queue, sizes = _queue(None, last_batch_s=LONG_LAST_BATCH_S)
    queue.start()
    # Nothing admitted is on its way: it goes after the 2 ms wait, not the 100 s hold.
    alone = queue.submit("image", np.full((1, 3), 0, dtype=np.int64))
    await asyncio.wait_for(alone, PATIENT_S)
    await _later(queue, 1, 7)
    await queue.aclose()
    assert [s[1] for s in sizes] == [1, 7]


async def test_shapes_and_kinds_never_share_a_batch() -> None:
    queue, sizes = _queue(None)
    queue.start()
    await asyncio.gather(
        queue.submit("text", np.ones((2, 8), dtype=np.int64)),
        queue.submit("text", np.ones((3, 16), dtype=np.int64)),
        queue.submit("image", np.ones((1, 8), dtype=np.int64)),
        queue.submit("text", np.ones((4, 8), dtype=np.int64)),
    )
    await queue.aclose()
    assert sorted(sizes) == [("image", 1, (8,)), ("text", 3, (16,)), ("text", 6, (8,))]


async def test_in_flight_batches_are_bounded_and_overlap() -> None:
    running, most = 0, 0
    release = asyncio.Event()

    async def run(kind: str, rows: np.ndarray, timeout_s: float | None) -> np.ndarray:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return np.zeros((len(rows), 1), dtype=np.float32)

    # Shapes differ, so the three entries are three batches. No wait (max_wait_s=0): a
    # queue past its bound would start the next batch within a few loop turns.
    for inflight, expected in ((1, 1), (2, 2)):
        running, most = 0, 0
        release.clear()
        queue = BatchQueue(
            run, max_batch_size=lambda: 8, max_wait_s=0.0, metrics=Metrics(),
            max_inflight=inflight,
        )  # fmt: skip
        queue.start()
        calls = [
            asyncio.ensure_future(queue.submit("text", np.ones((1, n), dtype=np.int64)))
            for n in (8, 16, 24)
        ]
        for _ in range(100):
            if running == expected:
                break
            await asyncio.sleep(0)
        await _turns()
        assert most == expected
        release.set()
        await asyncio.gather(*calls)
        await queue.aclose()
        assert queue.batches_run == 3


async def test_a_batch_gets_the_longest_deadline_of_its_callers() -> None:
    timeouts: list[float | None] = []

    async def run(kind: str, rows: np.ndarray, timeout_s: float | None) -> np.ndarray:
        timeouts.append(timeout_s)
        return np.zeros((len(rows), 1), dtype=np.float32)

    queue = BatchQueue(run, max_batch_size=lambda: 8, max_wait_s=0.02, metrics=Metrics())
    queue.start()
    rows = np.ones((1, 4), dtype=np.int64)
    await asyncio.gather(queue.submit("image", rows, 5.0), queue.submit("image", rows, 9.0))
    await asyncio.gather(queue.submit("image", rows, 5.0), queue.submit("image", rows, None))
    await queue.aclose()
    assert len(timeouts) == 2
    # 9 s less the time spent queued; anything above 5 s is the longer one (4 s of slack
    # for a 20 ms wait: safe on any machine).
    assert timeouts[0] is not None and 5.0 < timeouts[0] <= 9.0
    assert timeouts[1] is None  # one caller waits forever: so may the batch


async def test_a_failed_batch_fails_its_callers_and_the_queue_goes_on() -> None:
    calls = 0

    async def run(kind: str, rows: np.ndarray, timeout_s: float | None) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return np.zeros((len(rows), 1), dtype=np.float32)

    queue = BatchQueue(run, max_batch_size=lambda: 8, max_wait_s=0.001, metrics=Metrics())
    queue.start()
    rows = np.ones((1, 4), dtype=np.int64)
    first = await asyncio.gather(queue.submit("image", rows), return_exceptions=True)
    assert isinstance(first[0], RuntimeError)
    assert (await queue.submit("image", rows)).shape == (1, 1)
    await queue.aclose()


class _GatedInner:
    """A backend whose batch limit is learnt late; image calls wait while `gate` is shut."""

    name = "fake"

    def __init__(self) -> None:
        self.max_batch_size = 64
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls: list[tuple[str, int, float | None]] = []

    async def start(self) -> None:
        self.max_batch_size = 4  # like Triton once it has read the model configs

    async def ready(self) -> bool:
        return True

    async def embed_images(self, rows: np.ndarray, *, timeout_s: float | None = None) -> np.ndarray:
        self.calls.append(("image", len(rows), timeout_s))
        await self.gate.wait()
        return np.zeros((len(rows), 2), dtype=np.float32)

    async def embed_texts(self, rows: np.ndarray, *, timeout_s: float | None = None) -> np.ndarray:
        self.calls.append(("text", rows.shape[1], timeout_s))
        if rows[0, 0] < 0:
            raise ValueError("text tower exploded")
        return np.zeros((len(rows), 2), dtype=np.float32)

    async def aclose(self) -> None:
        pass


async def test_batched_backend_follows_the_inner_limit_and_maps_errors() -> None:
    inner = _GatedInner()
    backend = BatchedBackend(
        inner, metrics=Metrics(), max_batch_size=32, max_wait_s=0.01, max_inflight=1
    )
    assert backend.max_batch_size == 32
    await backend.start()
    assert backend.max_batch_size == 4 and backend.name == "fake"
    rows = np.zeros((1, 3, 2, 2), dtype=np.uint8)
    out = await asyncio.gather(*(backend.embed_images(rows, timeout_s=PATIENT_S) for _ in range(8)))
    assert [o.shape for o in out] == [(1, 2)] * 8
    assert [c[1] for c in inner.calls] == [4, 4]  # merged, never past the inner limit
    with pytest.raises(BackendFailure, match="text encoder failed: text tower exploded"):
        await backend.embed_texts(np.full((1, 8), -1, dtype=np.int64))
    inner.gate.clear()
    calls = len(inner.calls)
    deadline_s = 5.0
    with pytest.raises(DeadlineExceeded):
        # The gate is shut: only the deadline can end this call. 5 s, so that its batch
        # has reached the backend first (after the 10 ms wait: a 500-fold margin; a
        # shorter deadline could pass first on a loaded machine, and a batch whose
        # caller is gone before it starts is rightly skipped).
        await asyncio.wait_for(backend.embed_images(rows, timeout_s=deadline_s), PATIENT_S)
    # Its batch is at the backend, held.
    assert len(inner.calls) == calls + 1, (
        f"the batch never reached the backend within its {deadline_s} s deadline"
    )
    assert backend.batches_run == 2
    inner.gate.set()  # the abandoned batch still runs to its end
    for _ in range(100):
        if backend.batches_run == 3:
            break
        await asyncio.sleep(0)
    assert backend.batches_run == 3  # the failed text batch does not count
    await backend.aclose()


async def test_text_batches_lose_the_columns_after_their_last_end_of_text() -> None:
    inner = _GatedInner()
    backend = BatchedBackend(
        inner, metrics=Metrics(), max_batch_size=8, max_wait_s=0.01, max_inflight=1
    )
    await backend.start()
    eot = 49407
    short = np.array([[eot - 1, 5, eot, 0, 0, 0, 0, 0]])  # end-of-text at column 2
    longer = np.array([[eot - 1, 5, 6, 7, eot, 0, 0, 0]])  # at column 4
    await asyncio.gather(backend.embed_texts(short), backend.embed_texts(longer))
    await backend.embed_texts(short)
    await backend.aclose()
    assert [c[1] for c in inner.calls] == [5, 3]  # one batch to column 4, then alone to 2


async def test_a_backlog_waits_briefly_for_the_callers_just_answered() -> None:
    # 3 entries queued while the last batch ran; 5 callers come back later, without
    # having been admitted: the backlog lingers (up to a tenth of that batch) and they merge.
    queue, sizes = _queue(None, last_batch_s=LONG_LAST_BATCH_S)
    first = [
        asyncio.ensure_future(queue.submit("image", np.full((1, 3), i, dtype=np.int64)))
        for i in range(3)
    ]
    await asyncio.sleep(0)
    queue.start()
    await asyncio.gather(*first, _later(queue, 3, 5))
    await queue.aclose()
    assert [s[1] for s in sizes] == [8]


@pytest.mark.timeout(60)  # the bug this guards against was a busy loop: a hang
async def test_an_entry_over_a_limit_that_shrank_still_runs() -> None:
    limit = [8]
    sizes: list[int] = []

    async def run(kind: str, rows: np.ndarray, timeout_s: float | None) -> np.ndarray:
        sizes.append(len(rows))
        return np.zeros((len(rows), 1), dtype=np.float32)

    queue = BatchQueue(run, max_batch_size=lambda: limit[0], max_wait_s=0.001, metrics=Metrics())
    big = asyncio.ensure_future(queue.submit("image", np.ones((6, 4), dtype=np.int64)))
    small = asyncio.ensure_future(queue.submit("image", np.ones((1, 4), dtype=np.int64)))
    await asyncio.sleep(0)
    limit[0] = 4  # e.g. Triton's config, read after these were queued
    queue.start()
    await asyncio.wait_for(asyncio.gather(big, small), PATIENT_S)
    await queue.aclose()
    assert sizes == [6, 1]


async def test_a_batch_is_traced_in_its_first_traced_callers_trace() -> None:
    """An untraced entry (a health probe's forward pass) first in a batch does not take
    the batch's `backend` span, and Triton's spans under it, out of the caller's trace."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service.telemetry import build_tracer_provider

    exporter = InMemorySpanExporter()
    provider = build_tracer_provider("", "t", exporter)
    tracer = provider.get_tracer("t")
    admission = Admission(100, Metrics())
    admission.admit(8)  # the batch waits for all 8 rows: one batch, whatever the clock
    queue, sizes = _queue(admission, last_batch_s=LONG_LAST_BATCH_S, tracer=tracer)
    queue.start()
    try:
        untraced = asyncio.ensure_future(queue.submit("image", np.zeros((1, 3), np.int64)))
        await _turns()

        async def traced() -> tuple[int, np.ndarray]:
            with tracer.start_as_current_span("call") as span:
                rows = await queue.submit("image", np.ones((7, 3), np.int64))
                return span.get_span_context().trace_id, rows

        trace_id, _ = await asyncio.wait_for(traced(), PATIENT_S)
        await asyncio.wait_for(untraced, PATIENT_S)
    finally:
        await queue.aclose()
    provider.force_flush()
    assert sizes == [("image", 8, (3,))]  # one batch: the untraced entry first
    backend = [s for s in exporter.get_finished_spans() if s.name == "backend"]
    assert len(backend) == 1 and backend[0].context.trace_id == trace_id
