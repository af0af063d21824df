"""A gateway gives the memory of large decodes back (issue 24's soak: RSS within 300 MB
of its warm baseline under hostile traffic). A real `clipsvc serve` process decodes
49 MP photos; afterwards its resident memory is back near where it was.

glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so
after the first large image, Pillow's 16 MiB blocks came from the heap and stayed there
(about +200 MB for good). The gateway fixes the threshold at start (`service.memory`)."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
from PIL import Image

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.processes.gateway import GatewayProcess
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration

SIDE = 7000  # 49 MP, under the default --max-image-pixels of 50 MP
#: What decodes may keep for good: far below the ~200 MB kept before, above the noise of
#: gRPC buffers and the interpreter's own heaps.
KEPT_BOUND_MB = 100


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _big_jpeg(seed: int) -> bytes:
    # Blocks of 16 pixels: a real 49 MP canvas, cheap to encode and small on the wire.
    tile = np.random.default_rng(seed).integers(0, 256, (SIDE // 16, SIDE // 16, 3), np.uint8)
    canvas = tile.repeat(16, axis=0).repeat(16, axis=1)
    out = io.BytesIO()
    Image.fromarray(canvas).save(out, "JPEG", quality=80)
    return out.getvalue()


async def test_large_decodes_leave_no_resident_memory_behind(demo_model: ExportedModel) -> None:
    photos = [_big_jpeg(seed) for seed in range(4)]
    with GatewayProcess(demo_model.repository, local_cache_items=0) as gateway:
        pid = gateway.pid
        assert pid is not None
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            stub = clip_pb2_grpc.ClipServiceStub(channel)
            small = [encode(photo_like(640, 480, seed=i), "JPEG") for i in range(8)]
            for _ in range(3):  # warm: threads, pools, the model's first batches
                await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=small), timeout=120)
            warm = _rss_mb(pid)
            for _ in range(2):
                calls = [
                    stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[p]), timeout=300)
                    for p in photos
                ]
                answers = await asyncio.gather(*calls)
                assert all(len(a.embeddings) == 1 for a in answers)
            await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=small), timeout=120)
            after = _rss_mb(pid)
    assert after - warm < KEPT_BOUND_MB, f"RSS {warm:.0f} MB warm, {after:.0f} MB after"


def _minor_faults(pid: int) -> int:
    """Pages the process has faulted in (zero-filled or mapped anew) so far: /proc stat's
    `minflt` (field 10; the fields after the parenthesized name start at 3)."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


async def test_steady_requests_reuse_the_heap_instead_of_faulting_pages_anew(
    demo_model: ExportedModel,
) -> None:
    """The same request again and again keeps its buffers' pages: glibc's trim threshold
    is raised with the mmap threshold (`service.memory`). Left at 128 KiB, every ~1 MB
    buffer freed at the heap's top went back to the kernel and the next request faulted
    it in again, zero-filled: ~250 pages per MB, half of the gateway's CPU per image on
    the pre-sized pixel path (bench/results/gateway-cpu.md)."""
    side = 64  # the demo model's S: 12 KiB of pixels an image
    pixels = [bytes([i]) * (side * side * 3) for i in range(96)]  # ~1.2 MB a request
    request = clip_pb2.EmbedImageRequest(pixels=pixels)
    with GatewayProcess(demo_model.repository, local_cache_items=0) as gateway:
        pid = gateway.pid
        assert pid is not None
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            stub = clip_pb2_grpc.ClipServiceStub(channel)
            for _ in range(5):  # warm: threads, pools, the model's batch shapes
                await stub.EmbedImage(request, timeout=120)
            before = _minor_faults(pid)
            calls = 20
            for _ in range(calls):
                answer = await stub.EmbedImage(request, timeout=120)
                assert len(answer.embeddings) == len(pixels)
            per_call = (_minor_faults(pid) - before) / calls
    # Measured: ~22,000 pages a request with the trim threshold left at 128 KiB (the
    # request's buffers and the forward pass's, every time), 10-100 with it raised (the
    # allocator's and interpreter's own bookkeeping, a thread stack now and then).
    assert per_call < 1_000, f"{per_call:.0f} pages faulted in per request"
