"""Priority lanes with fakes: batch order, the age bound that keeps bulk from starving,
admission bounds per lane, and the lane reaching the backend as a priority level.

No test races a clock: the backend is held by an event, and an entry's age is set by
hand (its `enqueued` time), not waited for.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.api.clip.v1 import clip_pb2
from service.backends.base import CALL_PRIORITY
from service.core import lanes
from service.core.admission import Admission
from service.core.batched_backend import BatchedBackend
from service.core.batching import BatchQueue
from service.errors import InvalidInput, Overloaded
from service.metrics import Metrics
from service.server.servicer import lane_of


class _HeldRun:
    """A fake backend call: records each batch (its lane and first values), runs when let."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.arrived = asyncio.Event()
        self.go = asyncio.Event()
        self.go.set()

    async def __call__(self, kind: str, rows: np.ndarray, timeout_s: float | None) -> np.ndarray:
        self.batches.append((lanes.current(), [int(r[0]) for r in rows]))
        self.arrived.set()
        await self.go.wait()
        return rows[:, :1].astype(np.float32)


def _queue(run: _HeldRun, **options: object) -> BatchQueue:
    return BatchQueue(
        run,
        max_batch_size=lambda: 2,
        max_wait_s=0.001,
        metrics=Metrics(),
        **options,  # type: ignore[arg-type]
    )


def _rows(value: int) -> np.ndarray:
    return np.full((1, 3), value, dtype=np.int64)


async def _turns(n: int = 200) -> None:
    """Let ready callbacks run `n` times (no clock involved)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def _until_batches(run: _HeldRun, n: int) -> None:
    """Until `n` batches reached the backend (the queue's short wait is a timer)."""
    async with asyncio.timeout(30):
        while len(run.batches) < n:
            run.arrived.clear()
            await run.arrived.wait()


async def test_interactive_work_goes_before_bulk_queued_earlier() -> None:
    run = _HeldRun()
    queue = _queue(run)
    queue.start()
    run.go.clear()
    first = asyncio.ensure_future(queue.submit("image", _rows(0), lane=lanes.BULK))
    await _until_batches(run, 1)
    assert run.batches == [("bulk", [0])]  # running, held
    bulk = [
        asyncio.ensure_future(queue.submit("image", _rows(i), lane=lanes.BULK)) for i in range(1, 7)
    ]
    await _turns()
    interactive = [
        asyncio.ensure_future(queue.submit("image", _rows(100 + i), lane=lanes.INTERACTIVE))
        for i in range(3)
    ]
    await _turns()
    run.go.set()
    await asyncio.gather(first, *bulk, *interactive)
    await queue.aclose()
    # Interactive batches first (never topped up with bulk rows), then bulk in its order.
    assert run.batches == [
        ("bulk", [0]),
        ("interactive", [100, 101]),
        ("interactive", [102]),
        ("bulk", [1, 2]),
        ("bulk", [3, 4]),
        ("bulk", [5, 6]),
    ]


async def test_bulk_that_waited_past_its_age_bound_goes_first() -> None:
    run = _HeldRun()
    queue = _queue(run, bulk_max_wait_s=5.0)
    run.go.clear()
    queue.start()
    first = asyncio.ensure_future(queue.submit("image", _rows(0)))
    await _until_batches(run, 1)
    old = asyncio.ensure_future(queue.submit("image", _rows(1), lane=lanes.BULK))
    young = asyncio.ensure_future(queue.submit("image", _rows(2), lane=lanes.BULK))
    waiting = [asyncio.ensure_future(queue.submit("image", _rows(10 + i))) for i in range(4)]
    await _turns()
    queue._entries[0].enqueued -= 6.0  # the first bulk entry has waited past the bound
    run.go.set()
    await asyncio.gather(first, old, young, *waiting)
    await queue.aclose()
    # The aged bulk entry goes next (with its lane-mates), then interactive work again.
    assert run.batches == [
        ("interactive", [0]),
        ("bulk", [1, 2]),
        ("interactive", [10, 11]),
        ("interactive", [12, 13]),
    ]


async def test_without_interactive_work_bulk_runs_at_once() -> None:
    run = _HeldRun()
    queue = _queue(run)
    queue.start()
    out = await asyncio.wait_for(queue.submit("image", _rows(7), lane=lanes.BULK), 30)
    await queue.aclose()
    assert out.tolist() == [[7.0]] and run.batches == [("bulk", [7])]


def test_each_lane_is_admitted_within_its_own_bound() -> None:
    admission = Admission(4, Metrics(), bulk_limit=3)
    admission.admit(3, lanes.BULK)
    with pytest.raises(Overloaded, match="3 bulk items queued, limit 3"):
        admission.admit(1, lanes.BULK)
    admission.admit(4, lanes.INTERACTIVE)  # a full bulk lane takes no interactive place
    assert admission.admitted == 7
    with pytest.raises(Overloaded, match="4 items queued, limit 4"):
        admission.admit(1, lanes.INTERACTIVE)
    with lanes.using(lanes.BULK):  # no lane named: the call's
        admission.release(3)
        admission.admit(2)
    assert admission.by_lane == {"interactive": 4, "bulk": 2}


async def test_the_backend_gets_the_batch_lane_as_a_priority_level() -> None:
    seen: list[int] = []

    class _Inner:
        name = "fake"
        max_batch_size = 8

        async def start(self) -> None:
            pass

        async def ready(self) -> bool:
            return True

        async def embed_images(
            self, pixels: np.ndarray, *, timeout_s: float | None = None
        ) -> np.ndarray:
            seen.append(CALL_PRIORITY.get())
            return np.zeros((len(pixels), 2), dtype=np.float32)

        async def embed_texts(self, ids: np.ndarray, *, timeout_s: float | None = None) -> None:
            raise AssertionError("no texts here")

        async def aclose(self) -> None:
            pass

    backend = BatchedBackend(
        _Inner(), metrics=Metrics(), max_batch_size=8, max_wait_s=0.001, max_inflight=1
    )
    await backend.start()
    pixels = np.zeros((1, 3, 2, 2), dtype=np.uint8)
    await backend.embed_images(pixels)
    with lanes.using(lanes.BULK):
        await backend.embed_images(pixels)
    await backend.aclose()
    assert seen == [lanes.TRITON_PRIORITY["interactive"], lanes.TRITON_PRIORITY["bulk"]] == [1, 2]
    assert CALL_PRIORITY.get() == 0  # set only around the backend call


def test_priority_values_on_both_transports() -> None:
    assert lane_of(clip_pb2.PRIORITY_UNSPECIFIED, lanes.BULK) == "bulk"
    assert lane_of(clip_pb2.PRIORITY_UNSPECIFIED, lanes.INTERACTIVE) == "interactive"
    assert lane_of(clip_pb2.PRIORITY_BULK, lanes.INTERACTIVE) == "bulk"
    assert lane_of(clip_pb2.PRIORITY_INTERACTIVE, lanes.BULK) == "interactive"
    with pytest.raises(InvalidInput, match="unknown priority 9"):
        lane_of(9, lanes.INTERACTIVE)
    assert lanes.parse(None) == lanes.parse("") == "interactive"
    assert lanes.parse(" Bulk ") == "bulk"
    with pytest.raises(InvalidInput, match="priority: must be one of interactive, bulk"):
        lanes.parse("urgent")
    with pytest.raises(InvalidInput):
        lanes.parse(2)
