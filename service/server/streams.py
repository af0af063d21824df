"""Answering a request stream: each request's work runs concurrently, answers are written
as they finish, and at most a window of requests is read and not yet answered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from service.server.interceptors import Undecodable

_In = TypeVar("_In")
_Out = TypeVar("_Out")

#: Items read and not yet written back, per stream: enough to fill batches, and the bound
#: on what a client that writes without reading can make us hold.
STREAM_WINDOW = 64


async def answer_stream(
    requests: AsyncIterator[_In],
    work: Callable[[_In], Awaitable[_Out]],
    window: int = STREAM_WINDOW,
) -> AsyncIterator[_Out]:
    """`work` on each request concurrently, answers as they finish; at most `window` read
    and not yet written. A slot is freed only once its answer has been written: a client
    that writes and never reads stalls its own stream (HTTP/2 flow control blocks the
    write), and reading stops after `window`. A message that could not be decoded ends
    the stream with its refusal. Close it (`contextlib.aclosing`) to cancel its work."""
    slots = asyncio.Semaphore(window)
    answers: asyncio.Queue[_Out | None] = asyncio.Queue()
    workers: set[asyncio.Task[None]] = set()

    async def run(request: _In) -> None:
        answers.put_nowait(await work(request))  # at most `window` wait here

    async def read() -> None:
        try:
            async for request in requests:
                if isinstance(request, Undecodable):  # the stream cannot go on
                    raise request.refusal()
                await slots.acquire()
                task = asyncio.create_task(run(request))
                workers.add(task)
                task.add_done_callback(workers.discard)
            if workers:
                await asyncio.gather(*list(workers))
        finally:
            answers.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (answer := await answers.get()) is not None:
            yield answer
            slots.release()  # written: the next item may be read
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
        for task in list(workers):
            task.cancel()
