"""`clipsvc serve` as a real process and SIGTERM: NOT_SERVING, new calls refused, in-flight
calls drained, and cancelled when `--shutdown-grace-s` runs out; exit 0 either way.

The child is the real `clipsvc serve` with its backend behind a gate (`FileGate`): the
in-flight calls are held there for as long as each test needs, on any machine, instead
of being made big enough to still run when the signal lands.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.client import decode_embedding
from service.processes.metric_samples import sample, scrape
from tests.support.gate import FileGate, GatedGatewayProcess
from tests.support.http_json import http_json, image_input
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.polling import eventually
from tests.support.reference import exported_image_vectors

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CALLS, PER_CALL = 6, 4


@pytest.fixture
def gate(tmp_path: Path) -> FileGate:
    return FileGate(tmp_path / "gate")


def _gateway(model: ExportedModel, gate: FileGate, grace_s: float) -> GatedGatewayProcess:
    return GatedGatewayProcess(
        model.repository, gate, shutdown_grace_s=grace_s, log_level="INFO", local_cache_items=0
    )


def _images() -> list[bytes]:
    # Distinct images (no cache or single-flight shortcuts).
    return [encode(photo_like(96, 72, seed=500 + i), "JPEG") for i in range(CALLS * PER_CALL)]


async def _start_held_calls(
    gateway: GatedGatewayProcess, stub: clip_pb2_grpc.ClipServiceStub, images: list[bytes]
) -> list[asyncio.Task[clip_pb2.EmbedResponse]]:
    """CALLS calls of PER_CALL images, all in the server and none able to finish."""
    gateway.gate.close()

    async def embed(i: int) -> clip_pb2.EmbedResponse:
        request = clip_pb2.EmbedImageRequest(images=images[i * PER_CALL : (i + 1) * PER_CALL])
        return await stub.EmbedImage(request, timeout=300)

    calls = [asyncio.create_task(embed(i)) for i in range(CALLS)]
    metrics_port = gateway.metrics_port
    await eventually(
        lambda: sample(scrape(metrics_port), "clip_requests_in_flight", method="EmbedImage"),
        lambda n: n == CALLS,
        what=f"{CALLS} calls in flight",
        blocking=True,
    )
    await gateway.gate.wait_rows(1)  # the first batch is at the gate: nothing can finish
    assert not any(c.done() for c in calls)
    return calls


async def _new_call_code(target: str) -> grpc.StatusCode:
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            await clip_pb2_grpc.ClipServiceStub(channel).EmbedText(
                clip_pb2.EmbedTextRequest(texts=["a new call"]), timeout=10
            )
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.fixture
def draining_gateway(demo_model: ExportedModel, gate: FileGate) -> Iterator[GatedGatewayProcess]:
    # A grace far longer than the test: the calls finish because the gate opens.
    with _gateway(demo_model, gate, grace_s=120) as gateway:
        yield gateway


async def test_sigterm_flips_health_refuses_new_calls_and_drains_in_flight(
    draining_gateway: GatedGatewayProcess, demo_model: ExportedModel
) -> None:
    gateway = draining_gateway
    images = _images()
    async with grpc.aio.insecure_channel(gateway.target) as channel:
        stub = clip_pb2_grpc.ClipServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        calls = await _start_held_calls(gateway, stub, images)

        gateway.send_signal(signal.SIGTERM, group=False)  # as Kubernetes does
        # Health says so to a watcher at once; any error here fails the test.
        assert (await asyncio.wait_for(watch.read(), 60)).status == NOT_SERVING
        watch.cancel()  # a watch is a call too: the drain would wait for it
        # New calls are refused while the held ones are still in flight. A call that
        # slipped in between NOT_SERVING and the listener closing was accepted: it is
        # answered, runs out of its own 10 s (its batch held at the closed gate), or is
        # cancelled by grpc's server stop that caught it starting (both seen under load).
        refused: list[grpc.StatusCode] = []
        deadline = asyncio.get_running_loop().time() + 90
        while not refused or refused[-1] != grpc.StatusCode.UNAVAILABLE:
            assert asyncio.get_running_loop().time() < deadline, refused
            refused.append(await _new_call_code(gateway.target))
        slipped_in = {
            grpc.StatusCode.OK,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,
        }
        assert set(refused[:-1]) <= slipped_in, refused
        assert not any(c.done() for c in calls) and gateway.running

        gateway.gate.open()
        results = await asyncio.gather(*calls, return_exceptions=True)
    exit_code = await asyncio.to_thread(gateway.wait, 120)
    output = gateway.log_tail(100_000)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{failed[0]}\n--- server output ---\n{output[-3000:]}"
    got = np.stack([decode_embedding(e) for r in results for e in r.embeddings])
    assert got.shape == (CALLS * PER_CALL, 64), "an in-flight call was dropped"
    assert np.abs(got - exported_image_vectors(demo_model, images)).max() <= 1e-5
    assert exit_code == 0
    assert "shutting down" in output and "stopped" in output


def _http_refused(port: int) -> str:
    """What a new `/v1/embeddings` call meets: its status, or the connection error."""
    try:
        status, _ = http_json(port, "/v1/embeddings", {"input": "a new call"}, timeout_s=10)
    except OSError as exc:
        reason = getattr(exc, "reason", exc)  # urllib wraps the socket's error
        return type(reason).__name__
    return str(status)


async def test_sigterm_drains_http_calls_in_flight_and_refuses_new_ones(
    draining_gateway: GatedGatewayProcess, demo_model: ExportedModel
) -> None:
    """The HTTP door on a rolling update: calls in flight when SIGTERM lands are answered
    in full (not cut or reset), `/ready` stops saying 200, new calls are refused, and the
    process exits 0 once they are done."""
    gateway = draining_gateway
    images = _images()[: CALLS * PER_CALL]
    port, metrics_port = gateway.http_port, gateway.metrics_port
    gateway.gate.close()

    # Threads of their own: held, they would fill asyncio's default executor (6 threads
    # on 2 CPUs), which the metric scrapes below need.
    callers = ThreadPoolExecutor(CALLS, thread_name_prefix="held-http")

    async def embed(i: int) -> tuple[int, dict[str, object]]:
        chunk = images[i * PER_CALL : (i + 1) * PER_CALL]
        body = {"input": [image_input(b) for b in chunk]}
        return await asyncio.get_running_loop().run_in_executor(
            callers, lambda: http_json(port, "/v1/embeddings", body, timeout_s=300)
        )

    calls = [asyncio.create_task(embed(i)) for i in range(CALLS)]
    await eventually(
        lambda: sample(scrape(metrics_port), "clip_requests_in_flight", method="http:embeddings"),
        lambda n: n == CALLS,
        what=f"{CALLS} HTTP calls in flight",
        blocking=True,
    )
    await gateway.gate.wait_rows(1)
    assert (await asyncio.to_thread(http_json, port, "/ready"))[0] == 200

    gateway.send_signal(signal.SIGTERM, group=False)
    # Until the listener is closed. A call that slipped in before it was is accepted,
    # as on gRPC: answered (200, or 503 once the model stopped), or still held by the
    # closed gate when its own 10 s run out.
    seen: list[str] = []
    deadline = asyncio.get_running_loop().time() + 90
    while not seen or seen[-1] != "ConnectionRefusedError":
        assert asyncio.get_running_loop().time() < deadline, seen
        seen.append(await asyncio.to_thread(_http_refused, port))
    assert set(seen[:-1]) <= {"200", "503", "TimeoutError"}, seen
    assert not any(c.done() for c in calls) and gateway.running

    gateway.gate.open()
    results = await asyncio.gather(*calls, return_exceptions=True)
    callers.shutdown()
    exit_code = await asyncio.to_thread(gateway.wait, 120)
    output = gateway.log_tail(100_000)
    failed = [r for r in results if isinstance(r, BaseException) or r[0] != 200]
    assert not failed, f"{failed[0]}\n--- server output ---\n{output[-3000:]}"
    got = np.array(
        [d["embedding"] for _, answer in results for d in answer["data"]], dtype=np.float32
    )
    assert got.shape == (CALLS * PER_CALL, 64), "an in-flight call was cut short"
    assert np.abs(got - exported_image_vectors(demo_model, images)).max() <= 1e-5
    assert exit_code == 0


async def test_in_flight_calls_are_cancelled_when_the_grace_runs_out(
    demo_model: ExportedModel, gate: FileGate
) -> None:
    grace_s = 3.0
    with _gateway(demo_model, gate, grace_s=grace_s) as gateway:
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            stub = clip_pb2_grpc.ClipServiceStub(channel)
            calls = await _start_held_calls(gateway, stub, _images())
            signalled = time.monotonic()
            gateway.send_signal(signal.SIGTERM, group=False)
            ended: list[float] = []
            for call in calls:
                call.add_done_callback(lambda _: ended.append(time.monotonic()))
            results = await asyncio.gather(*calls, return_exceptions=True)
        exit_code = await asyncio.to_thread(gateway.wait, 120)
        output = gateway.log_tail(100_000)
    # The gate never opened: each call was cut off by the server, not answered.
    codes = [r.code() if isinstance(r, grpc.aio.AioRpcError) else r for r in results]
    assert codes == [grpc.StatusCode.UNAVAILABLE] * CALLS, f"{codes}\n{output[-3000:]}"
    # Not before the grace (a lower bound: a slow machine only adds to it); the upper
    # bound is generous and only catches a server that never cancels.
    assert min(ended) - signalled >= grace_s - 0.05, ended
    assert max(ended) - signalled <= grace_s + 60, ended
    assert exit_code == 0
    assert "shutting down" in output and "stopped" in output
