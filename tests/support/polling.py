"""Waiting for something observable (a metric, a count, a status) instead of sleeping."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

from service.processes.metric_samples import sample, scrape

T = TypeVar("T")


async def eventually(
    read: Callable[[], T | Awaitable[T]],
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
    HTTP scrape), so it runs in a thread and the event loop keeps serving meanwhile. An
    async `read` (a call to a server) is awaited.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await asyncio.to_thread(read) if blocking else read()
        if inspect.isawaitable(value):
            value = await value
        if done(value):  # type: ignore[arg-type]
            return value
        if loop.time() > deadline:
            raise AssertionError(f"not {what} within {timeout_s} s; last value: {value!r}")
        await asyncio.sleep(interval_s)  # poll interval, not a wait for the work


async def metric_reads(
    port: int | None, name: str, want: float, *, what: str, **labels: str
) -> float:
    """Scrape /metrics on `port` until `name` (the series with `labels`) reads `want`."""
    assert port is not None, "the gateway serves no /metrics"
    return await eventually(
        lambda: sample(scrape(port), name, **labels),
        lambda value: value == want,
        what=what,
        blocking=True,
    )
