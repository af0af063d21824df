"""Scale-out over Triton replicas (issue 15): one gateway, two real `tritonserver`s.

The gateway's `--triton-url` takes any gRPC target; with `ipv4:a:p,b:p` every call goes
to the next ready address (round robin), a call that finds its replica gone is tried on
another within the caller's deadline, and a restarted replica gets work again. The
health probes (`ready()`) run on a channel of their own, so they do not shift that
rotation: sequential calls alternate between the replicas, probes or not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.backends.triton import TritonBackend
from service.client import AsyncClipClient
from service.model.metadata import IMAGE_MODEL, ModelMetadata
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.triton_server import TritonProcess
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.triton import inference_statistics, start_triton

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

CALLERS = 8
# Generous bounds for a loaded 2-core machine; each phase ends as soon as it is shown.
PHASE_DEADLINE_S = 90.0
# Sequential calls, each followed by a health probe (what the gateway's health loop
# adds about once a second while one slow batch at a time is in flight).
SEQUENTIAL_ROUNDS = 40


@pytest.fixture(scope="module")
def replicas(
    demo_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TritonProcess, TritonProcess]]:
    repository: Path = demo_model.repository
    with (
        start_triton(repository, workdir=tmp_path_factory.mktemp("a")) as a,
        start_triton(repository, workdir=tmp_path_factory.mktemp("b")) as b,
    ):
        yield a, b


async def _inferences(triton: TritonProcess) -> int:
    if not triton.running:
        return 0
    return (await inference_statistics(triton.grpc_url, IMAGE_MODEL))["inference_count"]


async def test_two_replicas_share_load_survive_a_death_and_rejoin(
    demo_model: ExportedModel, replicas: tuple[TritonProcess, TritonProcess]
) -> None:
    a, b = replicas
    target = f"ipv4:{a.grpc_url},{b.grpc_url}"
    settings = gateway_settings(
        demo_model.repository, backend="triton", triton_url=target, local_cache_items=0
    )
    errors: list[BaseException] = []
    calls = 0
    stop = asyncio.Event()
    async with running_gateway(settings) as gw:
        async with AsyncClipClient(f"127.0.0.1:{gw.port}") as client:

            async def caller(index: int) -> None:
                nonlocal calls
                seed = index * 1_000_000
                while not stop.is_set():
                    seed += 1  # every image new: no cache hit, every call reaches Triton
                    image = encode(photo_like(48, 40, seed=seed), "PNG")
                    try:
                        await client.embed_image([image])
                    except Exception as exc:  # any error a caller sees fails the test
                        errors.append(exc)
                    calls += 1

            loop = asyncio.get_running_loop()
            workers = [asyncio.create_task(caller(i)) for i in range(CALLERS)]
            try:
                # 1. Both replicas get a fair share (round robin, not pick-first).
                base_a, base_b = await _inferences(a), await _inferences(b)
                deadline = loop.time() + PHASE_DEADLINE_S
                while True:
                    got_a = await _inferences(a) - base_a
                    got_b = await _inferences(b) - base_b
                    if got_a + got_b >= 200:
                        break
                    assert loop.time() < deadline, (got_a, got_b)
                    await asyncio.sleep(0.2)
                share_a = got_a / (got_a + got_b)
                assert 0.25 <= share_a <= 0.75, (got_a, got_b)

                # 2. One replica dies under load: no caller sees an error.
                await asyncio.to_thread(a.kill)
                calls_at_kill = calls
                served_b = await _inferences(b)
                deadline = loop.time() + PHASE_DEADLINE_S
                while calls - calls_at_kill < 100 or await _inferences(b) - served_b < 50:
                    assert loop.time() < deadline, calls - calls_at_kill
                    await asyncio.sleep(0.2)
                assert not errors, errors[:3]

                # 3. It comes back on the same port: it gets work again (within 60 s).
                await asyncio.to_thread(a.start)
                rejoined = loop.time() + 60.0
                while await _inferences(a) == 0:
                    assert loop.time() < rejoined, "the restarted replica got no work"
                    await asyncio.sleep(0.2)
            finally:
                stop.set()
                await asyncio.gather(*workers)
    assert not errors, errors[:3]


async def test_health_probes_between_sequential_calls_do_not_pin_them_to_one_replica(
    demo_model: ExportedModel, replicas: tuple[TritonProcess, TritonProcess]
) -> None:
    """`ready()` makes five calls (server ready, two models ready, two configs). On the
    inference channel they moved its round robin on by an odd count between two
    sequential calls, so with two replicas every call went to the same one."""
    a, b = replicas
    metadata = ModelMetadata.load(demo_model.repository)
    size = metadata.image_size
    backend = TritonBackend(
        url=f"ipv4:{a.grpc_url},{b.grpc_url}",
        default_timeout_s=PHASE_DEADLINE_S,
        max_batch_size=8,
        expected_model_id=metadata.model_id,
        expected_weights_sha256=metadata.weights_sha256,
    )
    pixels = np.zeros((1, 3, size, size), dtype=np.uint8)
    base_a, base_b = await _inferences(a), await _inferences(b)
    await backend.start()
    try:
        for _ in range(SEQUENTIAL_ROUNDS):
            await backend.embed_images(pixels)
            assert await backend.ready()
    finally:
        await backend.aclose()
    # Triton counts a request just after it answers: wait until every call is counted.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PHASE_DEADLINE_S
    while True:
        got_a = await _inferences(a) - base_a
        got_b = await _inferences(b) - base_b
        if got_a + got_b >= SEQUENTIAL_ROUNDS:
            break
        assert loop.time() < deadline, (got_a, got_b)
        await asyncio.sleep(0.2)
    assert got_a + got_b == SEQUENTIAL_ROUNDS, (got_a, got_b)
    share_a = got_a / SEQUENTIAL_ROUNDS
    assert 0.25 <= share_a <= 0.75, (got_a, got_b)
