"""Many EmbedStream clients vanishing mid-stream: the server keeps serving, nothing leaks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.client import AsyncClipClient
from service.server.app import Gateway
from tests.support.images import encode, photo_like
from tests.support.polling import eventually

pytestmark = pytest.mark.integration


async def _abandoned_stream(port: int, seed: int, cancel_after: int) -> int:
    """Send items forever, read a few answers, then drop the whole channel."""
    image = encode(photo_like(80, 60, seed=seed), "JPEG")

    async def feed() -> AsyncIterator[clip_pb2.StreamRequest]:
        i = 0
        while True:
            kind = {"image": image} if i % 3 == 0 else {"text": f"stream {seed} item {i}"}
            yield clip_pb2.StreamRequest(id=str(i), **kind)
            i += 1
            await asyncio.sleep(0)

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = clip_pb2_grpc.ClipServiceStub(channel).EmbedStream(feed())
    received = 0
    try:
        async for _ in call:
            received += 1
            if received >= cancel_after:
                break
    finally:
        call.cancel()
        await channel.close(grace=None)
    return received


async def test_disconnecting_stream_clients(gateway: Gateway) -> None:
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        before = await client.embed_text(["the same question"])
        tasks_before = len(asyncio.all_tasks())
        received = await asyncio.gather(
            *(
                _abandoned_stream(gateway.port, seed, cancel_after=3 + seed % 7)
                for seed in range(24)
            )
        )
        assert all(r >= 3 for r in received)
        # Work already admitted drains; nothing stays queued or running for gone clients.
        await eventually(
            lambda: (gateway.embedder.admitted, len(asyncio.all_tasks()) - tasks_before),
            lambda state: state[0] == 0 and state[1] <= 2,
            what="admitted work drained and the streams' tasks gone",
            interval_s=0.05,
        )
        assert gateway.health.serving
        after = await client.embed_text(["the same question"])
        streamed = [answer async for answer in client.embed_stream([("x", "the same question")])]
    np.testing.assert_array_equal(before.vectors, after.vectors)
    assert streamed[0][0] == "x" and streamed[0][2] is None
