"""`--triton-shared-memory`: image batches reach a real tritonserver through /dev/shm (issue 28).

The vectors are open_clip's and equal those sent as gRPC bytes; the region is registered
with Triton and counted as used; a Triton that forgot the region (restarted, or
unregistered behind the gateway's back) costs no call; one that cannot map it gets bytes;
slots running out under concurrency cost nothing but bytes; closing the gateway
unregisters the region and removes its file.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio

from service.backends import shared_memory
from service.client import AsyncClipClient
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample
from service.processes.triton_server import TritonProcess
from service.server.app import Gateway
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.polling import eventually
from tests.support.reference import reference_images
from tests.support.triton import shared_memory_regions, start_triton

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TOL = 1e-5
# Same uint8 batch, same graph: only a batch-size-dependent last bit may differ.
SAME = 1e-6
PATIENT_S = 60.0
METRIC = "clip_triton_image_batches_total"


@pytest.fixture(scope="module")
def triton(
    demo_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonProcess]:
    with start_triton(demo_model.repository, workdir=tmp_path_factory.mktemp("tr")) as server:
        yield server


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    sizes = [(64, 64), (640, 480), (300, 500), (97, 61), (1024, 768), (50, 50)]
    return [encode(photo_like(w, h, seed=i), "JPEG") for i, (w, h) in enumerate(sizes)]


def _gateway(demo_model: ExportedModel, triton: TritonProcess, **settings: object):
    return running_gateway(
        gateway_settings(
            demo_model.repository,
            backend="triton",
            triton_url=triton.grpc_url,
            local_cache_items=0,  # every call reaches Triton
            **settings,
        )
    )


def _files(path: Path) -> list[Path]:
    """`path` itself if it is a file, else the files in it (none when it is missing)."""
    if path.is_file():
        return [path]
    return list(path.iterdir()) if path.is_dir() else []


def _batches(gateway: Gateway, transport: str) -> float:
    return sample(gateway.metrics.registry, METRIC, transport=transport)


async def _embed_until_shared(client: AsyncClipClient, gateway: Gateway, blobs: list[bytes]):
    """Calls go as bytes while the region is being registered; then through it."""
    before = _batches(gateway, "shared_memory")

    async def shared() -> bool:
        await client.embed_image(blobs[:1])
        return _batches(gateway, "shared_memory") > before

    await eventually(shared, what="an image batch through shared memory", timeout_s=PATIENT_S)


@pytest.fixture
async def bytes_vectors(
    demo_model: ExportedModel, triton: TritonProcess, blobs: list[bytes]
) -> AsyncIterator[np.ndarray]:
    async with _gateway(demo_model, triton) as gw:
        async with AsyncClipClient(f"127.0.0.1:{gw.port}") as client:
            yield (await client.embed_image(blobs)).vectors


async def test_images_go_through_shared_memory_with_open_clips_vectors(
    demo_model: ExportedModel, triton: TritonProcess, blobs: list[bytes], bytes_vectors: np.ndarray
) -> None:
    async with _gateway(demo_model, triton, triton_shared_memory=True) as gw:
        async with AsyncClipClient(f"127.0.0.1:{gw.port}") as client:
            await _embed_until_shared(client, gw, blobs)
            regions = await shared_memory_regions(triton.grpc_url)
            ours = list(regions.values())
            assert len(ours) == 1, regions
            assert _files(Path("/dev/shm", ours[0]["key"].lstrip("/")))
            before = _batches(gw, "shared_memory"), _batches(gw, "grpc")
            got = (await client.embed_image(blobs)).vectors
            assert _batches(gw, "shared_memory") > before[0]
            assert _batches(gw, "grpc") == before[1]  # nothing went as bytes
            # Texts are small: always bytes, never counted here.
            await client.embed_text(["a red circle"])
            assert _batches(gw, "grpc") == before[1]
            name = ours[0]["name"]
            path = Path("/dev/shm", ours[0]["key"].lstrip("/"))
    np.testing.assert_allclose(got, bytes_vectors, atol=SAME, rtol=0)
    assert np.abs(got - reference_images(demo_model, blobs)).max() <= TOL
    # Closed: Triton no longer holds the region, and its file is gone.
    assert name not in await shared_memory_regions(triton.grpc_url)
    assert not _files(path)


async def test_concurrent_calls_beyond_the_slots_go_as_bytes_and_stay_right(
    demo_model: ExportedModel, triton: TritonProcess, blobs: list[bytes], bytes_vectors: np.ndarray
) -> None:
    # One batch in flight: two slots. Sixty callers at once, each its own images.
    async with _gateway(
        demo_model, triton, triton_shared_memory=True, max_inflight_batches=1, max_batch_size=4
    ) as gw:
        async with AsyncClipClient(f"127.0.0.1:{gw.port}") as client:
            await _embed_until_shared(client, gw, blobs)
            order = [[(i + k) % len(blobs) for k in range(3)] for i in range(60)]
            answers = await asyncio.gather(
                *(client.embed_image([blobs[j] for j in idx]) for idx in order)
            )
            assert _batches(gw, "shared_memory") > 1
    for idx, answer in zip(order, answers, strict=True):
        np.testing.assert_allclose(answer.vectors, bytes_vectors[idx], atol=SAME, rtol=0)


async def test_a_triton_that_forgot_the_region_costs_no_call(
    demo_model: ExportedModel,
    triton: TritonProcess,
    blobs: list[bytes],
    bytes_vectors: np.ndarray,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _gateway(demo_model, triton, triton_shared_memory=True) as gw:
        async with AsyncClipClient(f"127.0.0.1:{gw.port}") as client:
            await _embed_until_shared(client, gw, blobs)
            # Behind the gateway's back, as a restarted Triton on the same connection
            # would: the next call names a region Triton does not know.
            admin = triton_aio.InferenceServerClient(triton.grpc_url)
            try:
                await admin.unregister_system_shared_memory()
            finally:
                await admin.close()
            assert not await shared_memory_regions(triton.grpc_url)
            caplog.clear()
            counts = _batches(gw, "shared_memory"), _batches(gw, "grpc")
            got = (await client.embed_image(blobs)).vectors
            np.testing.assert_allclose(got, bytes_vectors, atol=SAME, rtol=0)
            # Counted once, as the bytes it went as (not also as the refused attempt).
            assert _batches(gw, "shared_memory") == counts[0]
            assert _batches(gw, "grpc") > counts[1]
            # Sent again as bytes at once: Triton's NOT_FOUND for the region did not
            # count as the replica being gone (no reconnect, no failover).
            assert "unreachable" not in caplog.text
            # ... and it is registered again, and used.
            await _embed_until_shared(client, gw, blobs)
            assert await shared_memory_regions(triton.grpc_url)

            # A restarted Triton (a new process on the same port) gets it again too.
            triton.kill()
            await asyncio.to_thread(triton.start)

            async def answers() -> bool:
                try:
                    got = (await client.embed_image(blobs)).vectors
                except Exception:
                    return False
                np.testing.assert_allclose(got, bytes_vectors, atol=SAME, rtol=0)
                return True

            await eventually(
                answers, what="answering again after Triton's restart", timeout_s=PATIENT_S
            )
            await _embed_until_shared(client, gw, blobs)
            np.testing.assert_allclose(
                (await client.embed_image(blobs)).vectors, bytes_vectors, atol=SAME, rtol=0
            )


async def test_a_triton_that_cannot_map_the_region_gets_bytes(
    demo_model: ExportedModel,
    triton: TritonProcess,
    blobs: list[bytes],
    bytes_vectors: np.ndarray,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The gateway's region lies where Triton's shm_open does not look: as if Triton ran
    # on another host.
    monkeypatch.setattr(shared_memory, "SHM_DIR", tmp_path)
    async with _gateway(demo_model, triton, triton_shared_memory=True) as gw:
        async with AsyncClipClient(f"127.0.0.1:{gw.port}") as client:
            for _ in range(5):
                got = (await client.embed_image(blobs)).vectors
                np.testing.assert_allclose(got, bytes_vectors, atol=SAME, rtol=0)
                await asyncio.sleep(0.1)
            assert _batches(gw, "shared_memory") == 0
            assert _batches(gw, "grpc") >= 5
            assert not await shared_memory_regions(triton.grpc_url)
    assert not _files(tmp_path)  # closed: its file is gone


async def test_a_dev_shm_too_small_for_the_region_costs_nothing_but_bytes(
    demo_model: ExportedModel,
    triton: TritonProcess,
    blobs: list[bytes],
    bytes_vectors: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shared_memory.os, "posix_fallocate", full)
    async with _gateway(demo_model, triton, triton_shared_memory=True) as gw:
        async with AsyncClipClient(f"127.0.0.1:{gw.port}") as client:
            for _ in range(3):
                got = (await client.embed_image(blobs)).vectors
                np.testing.assert_allclose(got, bytes_vectors, atol=SAME, rtol=0)
            assert _batches(gw, "shared_memory") == 0
            assert _batches(gw, "grpc") >= 3  # what the operator sees on the dashboard
            assert not await shared_memory_regions(triton.grpc_url)
    assert "No space left on device" in caplog.text
    assert caplog.text.count("no shared memory for image batches") == 1  # said once


async def test_two_gateways_in_one_process_get_regions_of_their_own(
    demo_model: ExportedModel, triton: TritonProcess, blobs: list[bytes], bytes_vectors: np.ndarray
) -> None:
    # Same host, pid and model: were the name made of those alone, the second would take
    # over the first one's file, and their batches would overwrite each other's slots.
    async with (
        _gateway(demo_model, triton, triton_shared_memory=True, max_batch_size=4) as one,
        _gateway(demo_model, triton, triton_shared_memory=True, max_batch_size=4) as two,
        AsyncClipClient(f"127.0.0.1:{one.port}") as client_one,
        AsyncClipClient(f"127.0.0.1:{two.port}") as client_two,
    ):
        await _embed_until_shared(client_one, one, blobs)
        await _embed_until_shared(client_two, two, blobs)
        assert len(await shared_memory_regions(triton.grpc_url)) == 2
        order = [[(i + k) % len(blobs) for k in range(3)] for i in range(40)]
        answers = await asyncio.gather(
            *(
                (client_one if i % 2 else client_two).embed_image([blobs[j] for j in idx])
                for i, idx in enumerate(order)
            )
        )
        assert _batches(one, "shared_memory") > 1 and _batches(two, "shared_memory") > 1
    for idx, answer in zip(order, answers, strict=True):
        np.testing.assert_allclose(answer.vectors, bytes_vectors[idx], atol=SAME, rtol=0)
