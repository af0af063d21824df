"""`clipsvc serve` as a real process: SIGTERM flips health, drains in-flight calls, exits 0."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.processes.gateway import GatewayProcess
from service.processes.metric_samples import sample, scrape
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(vit_model: ExportedModel) -> Iterator[GatewayProcess]:
    # ViT-B-32 on the CPU: a few calls are seconds of forward passes, easy to catch mid-way.
    with GatewayProcess(vit_model.repository, shutdown_grace_s=30, log_level="INFO") as gateway:
        yield gateway


async def test_sigterm_drains_in_flight_calls(gateway: GatewayProcess) -> None:
    port, metrics_port = gateway.port, gateway.metrics_port
    # Distinct images (no cache or single-flight shortcuts), 8 per call.
    images = [encode(photo_like(96, 96, seed=i), "JPEG") for i in range(6 * 8)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = clip_pb2_grpc.ClipServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def embed(i: int) -> clip_pb2.EmbedResponse:
            request = clip_pb2.EmbedImageRequest(images=images[i * 8 : (i + 1) * 8])
            return await stub.EmbedImage(request, timeout=120)

        calls = [asyncio.create_task(embed(i)) for i in range(6)]
        for _ in range(200):  # until the server holds all six calls
            samples = await asyncio.to_thread(scrape, metrics_port)
            if sample(samples, "clip_requests_in_flight", method="EmbedImage") == 6:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the six calls never were in flight together")
        assert not any(c.done() for c in calls), "work finished before SIGTERM; make it bigger"
        gateway.send_signal(signal.SIGTERM, group=False)  # as Kubernetes does
        status = None
        for _ in range(50):
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                status = reply.status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
            except grpc.aio.AioRpcError:
                break  # already closed for new calls: also correct
            await asyncio.sleep(0.02)
        results = await asyncio.gather(*calls, return_exceptions=True)
    exit_code = await asyncio.to_thread(gateway.wait, 60)
    output = gateway.log_tail(100_000)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{failed[0]}\n--- server output ---\n{output[-3000:]}"
    assert all(len(r.embeddings) == 8 for r in results), "an in-flight call was dropped"
    assert status in (None, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert exit_code == 0
    assert "shutting down" in output and "stopped" in output
