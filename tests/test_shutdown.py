"""`clipsvc serve` as a real process: SIGTERM flips health, drains in-flight calls, exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from tests.conftest import ExportedModel, encode
from tests.gateway_support import free_port
from tests.hostile_inputs import photo_like


async def _wait_serving(port: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("server never became SERVING")


@pytest.fixture
def server_process(demo_model: ExportedModel) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "CLIP_PORT": str(port),
        "CLIP_METRICS_PORT": "-1",
        "CLIP_HOST": "127.0.0.1",
        "CLIP_SHUTDOWN_GRACE_S": "30",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--model-repository",
            str(demo_model.repository),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield process, port
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


async def test_sigterm_drains_in_flight_calls(
    server_process: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = server_process
    await _wait_serving(port)
    images = [encode(photo_like(300, 200, seed=i), "PNG") for i in range(24)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = clip_pb2_grpc.ClipServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def embed(i: int) -> clip_pb2.EmbedResponse:
            request = clip_pb2.EmbedImageRequest(images=images[i:] + images[:i])
            return await stub.EmbedImage(request, timeout=60)

        calls = [asyncio.create_task(embed(i)) for i in range(12)]
        await asyncio.sleep(0.3)  # the calls are in flight now
        assert not any(c.done() for c in calls), "work finished before SIGTERM; make it bigger"
        process.send_signal(signal.SIGTERM)
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
        results = await asyncio.gather(*calls)
    assert all(len(r.embeddings) == 24 for r in results), "an in-flight call was dropped"
    assert status in (None, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert process.wait(30) == 0
    output = process.stdout.read().decode()
    assert "shutting down" in output and "stopped" in output
