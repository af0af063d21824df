"""The production shape on one machine: gateway → real tritonserver (+ real redis-server).

Same vectors as the embedded backend; Triton's dynamic batcher merges concurrent calls;
a Triton crash answers UNAVAILABLE fast and heals by itself; a slow Triton turns into
DEADLINE_EXCEEDED while the gateway stays responsive.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.clip.v1 import clip_pb2
from service.client import AsyncClipClient
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.redis_server import RedisServer
from service.processes.triton_server import TritonProcess
from service.server.app import Gateway
from tests.support.gateway import stub_for
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.triton import inference_statistics, require_triton, start_triton

pytestmark = pytest.mark.integration

TEXTS = ["a red circle", "", "a photo of a purple hexagon on a gradient", "star " * 90]


@pytest.fixture(scope="module")
def triton(
    demo_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonProcess]:
    require_triton()
    with start_triton(demo_model.repository, workdir=tmp_path_factory.mktemp("tr")) as server:
        yield server


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
async def triton_gateway(
    demo_model: ExportedModel, triton: TritonProcess, redis: RedisServer
) -> AsyncIterator[Gateway]:
    settings = gateway_settings(
        demo_model.repository,
        backend="triton",
        triton_url=triton.grpc_url,
        redis_url=redis.url,
        local_cache_items=0,
    )
    async with running_gateway(settings) as gw:
        yield gw


@pytest.fixture(scope="module")
async def embedded_gateway(demo_model: ExportedModel) -> AsyncIterator[Gateway]:
    async with running_gateway(gateway_settings(demo_model.repository)) as gw:
        yield gw


def _images() -> list[bytes]:
    return [encode(photo_like(90 + 10 * i, 70, seed=500 + i), "PNG") for i in range(5)]


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
    return reply.status


async def _wait_health(port: int, status: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while await _health(port) != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        await asyncio.sleep(0.1)


async def _counts_since(
    triton: TritonProcess, model: str, before: dict[str, int], expected: int
) -> tuple[int, int]:
    """(inferences, executions) of `model` since `before`, once `expected` were counted."""
    deadline = time.monotonic() + 5
    while True:  # Triton updates its statistics just after answering
        after = await inference_statistics(triton.grpc_url, model)
        inferences = after["inference_count"] - before["inference_count"]
        if inferences >= expected or time.monotonic() > deadline:
            return inferences, after["execution_count"] - before["execution_count"]
        await asyncio.sleep(0.1)


async def test_triton_vectors_equal_embedded(
    triton_gateway: Gateway, embedded_gateway: Gateway
) -> None:
    images = _images()
    async with (
        AsyncClipClient(f"127.0.0.1:{triton_gateway.port}") as via_triton,
        AsyncClipClient(f"127.0.0.1:{embedded_gateway.port}") as in_process,
    ):
        info = await via_triton.model_info()
        t_text, e_text = await via_triton.embed_text(TEXTS), await in_process.embed_text(TEXTS)
        t_img, e_img = await via_triton.embed_image(images), await in_process.embed_image(images)
    assert info.backend == "triton"
    assert np.abs(t_text.vectors - e_text.vectors).max() <= 1e-5
    assert np.abs(t_img.vectors - e_img.vectors).max() <= 1e-5
    assert t_text.truncated == e_text.truncated == [False, False, False, True]


async def test_concurrent_calls_reach_triton_as_fewer_executions(
    triton_gateway: Gateway, triton: TritonProcess
) -> None:
    before = await inference_statistics(triton.grpc_url, "clip_image")
    images = [encode(photo_like(64, 64, seed=900 + i), "PNG") for i in range(64)]
    async with AsyncClipClient(f"127.0.0.1:{triton_gateway.port}") as client:
        await asyncio.gather(*(client.embed_image([image]) for image in images))
    inferences, executions = await _counts_since(triton, "clip_image", before, 64)
    assert inferences == 64
    assert executions <= 64 / 4, f"64 single-image calls ran as {executions} executions"


async def test_triton_crash_fails_fast_then_heals(
    triton_gateway: Gateway, triton: TritonProcess
) -> None:
    port = triton_gateway.port
    async with AsyncClipClient(f"127.0.0.1:{port}", timeout_s=10) as client:
        await client.embed_text(["before the crash"])
        triton.kill()
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.embed_text(["during the crash"])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.perf_counter() - started < 3
        await _wait_health(port, health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.to_thread(triton.start)
        await _wait_health(port, health_pb2.HealthCheckResponse.SERVING)
        healed = await client.embed_text(["after the restart"])
    assert healed.vectors.shape == (1, 64)


async def test_slow_triton_gives_deadline_exceeded_and_gateway_stays_responsive(
    triton_gateway: Gateway, triton: TritonProcess
) -> None:
    async with stub_for(triton_gateway.port) as stub:
        os.killpg(triton.pid, signal.SIGSTOP)  # Triton hangs: accepts nothing, answers nothing
        try:
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=["slow"]), timeout=1.0)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.perf_counter() - started < 3
            info = await stub.GetModelInfo(clip_pb2.GetModelInfoRequest(), timeout=2)
            assert info.backend == "triton"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=["bad"] * 10_000), timeout=2)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            os.killpg(triton.pid, signal.SIGCONT)
        await _wait_health(triton_gateway.port, health_pb2.HealthCheckResponse.SERVING)
        reply = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=["recovered"]), timeout=30)
    assert len(reply.embeddings) == 1


async def test_mixed_caption_lengths_batch_together_in_triton(
    triton_gateway: Gateway, embedded_gateway: Gateway, triton: TritonProcess
) -> None:
    """The gateway batches by length bucket, then Triton: vectors equal, few executions."""
    texts = [("word " * (1 + (i * 7) % 40)) + f"mixed {i}" for i in range(48)]
    before = await inference_statistics(triton.grpc_url, "clip_text")
    async with (
        AsyncClipClient(f"127.0.0.1:{triton_gateway.port}") as via_triton,
        AsyncClipClient(f"127.0.0.1:{embedded_gateway.port}") as in_process,
    ):
        got = await asyncio.gather(*(via_triton.embed_text([t]) for t in texts))
        want = await in_process.embed_text(texts)
    assert np.abs(np.concatenate([g.vectors for g in got]) - want.vectors).max() <= 1e-5
    requests, executions = await _counts_since(triton, "clip_text", before, 48)
    assert requests == 48
    # Sent one by one, these ran as ~40 executions (mean batch 1.2, bench/README); the
    # gateway's queue batches each length bucket, how many batches depends on arrivals.
    assert executions <= 48 / 2, f"48 mixed-length calls ran as {executions} executions"
