"""Waiting for something observable (a metric, a count, a status) instead of sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    read: Callable[[], T],
    done: Callable[[T], bool] = bool,
    *,
    what: str,
    timeout_s: float = 60.0,
    interval_s: float = 0.02,
    blocking: bool = False,
) -> T:
    """`read()` again and again until `done(value)`; returns that value.

    `timeout_s` only catches a hang: it is far above what the slowest machine needs,
    and the wait ends as soon as the condition holds. `blocking`: `read` blocks (an
    HTTP scrape), so it runs in a thread and the event loop keeps serving meanwhile.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await asyncio.to_thread(read) if blocking else read()
        if done(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"not {what} within {timeout_s} s; last value: {value!r}")
        await asyncio.sleep(interval_s)  # poll interval, not a wait for the work
