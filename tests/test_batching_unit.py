"""The batching queue: merging, shapes kept apart, holding a batch open for arrivals."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.core.admission import Admission
from service.core.batching import BatchQueue
from service.metrics import Metrics


def _queue(admission: Admission | None, last_forward_s: float = 0.0) -> tuple[BatchQueue, list]:
    sizes: list[tuple[str, int, tuple[int, ...]]] = []

    def run(kind: str, rows: np.ndarray) -> np.ndarray:
        sizes.append((kind, len(rows), rows.shape[1:]))
        return rows.reshape(len(rows), -1)[:, :1].astype(np.float32)

    queue = BatchQueue(
        run,
        ThreadPoolExecutor(1),
        max_batch_size=8,
        max_wait_s=0.002,
        metrics=Metrics(),
        admission=admission,
    )
    queue._last_forward_s = last_forward_s
    return queue, sizes


async def _late_submits(queue: BatchQueue, n: int, delay_s: float) -> list[np.ndarray]:
    async def one(i: int) -> np.ndarray:
        await asyncio.sleep(0 if i == 0 else delay_s)
        return await queue.submit("image", np.full((1, 3), i, dtype=np.int64))

    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_holds_the_batch_open_while_admitted_items_are_on_their_way() -> None:
    admission = Admission(100, Metrics())
    admission.admit(8)  # 8 items admitted; 7 of them still "decoding" for 30 ms
    queue, sizes = _queue(admission, last_forward_s=0.4)
    queue.start()
    answers = await _late_submits(queue, 8, 0.03)
    await queue.aclose()
    assert [s[1] for s in sizes] == [8]
    assert [int(a[0, 0]) for a in answers] == list(range(8))  # each caller gets its own row


async def test_without_arrivals_a_batch_goes_after_the_short_wait() -> None:
    queue, sizes = _queue(None, last_forward_s=0.4)
    queue.start()
    await _late_submits(queue, 8, 0.03)
    await queue.aclose()
    assert sizes[0][1] == 1 and sum(s[1] for s in sizes) == 8


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
