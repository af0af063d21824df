"""Bounded in-flight work and callers that leave mid-batch."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch

from service.api.clip.v1 import clip_pb2
from service.client import decode_embedding
from service.core.image_preprocess import ImageLimits, ImageSpec, preprocess_image_bytes
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample, scrape
from tests.support.gateway import stub_for
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration


async def _call(
    stub: object, images: list[bytes], deadline_s: float
) -> tuple[grpc.StatusCode, object]:
    try:
        request = clip_pb2.EmbedImageRequest(images=images)
        reply = await stub.EmbedImage(request, timeout=deadline_s)
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, reply


async def test_queue_bound_refuses_at_once_and_recovers(vit_model: ExportedModel) -> None:
    settings = gateway_settings(vit_model.repository, max_queued_items=8, max_batch_size=4)
    images = [encode(photo_like(64, 64, seed=100 + i), "PNG") for i in range(48)]
    async with running_gateway(settings) as gw, stub_for(gw.port) as stub:
        results = await asyncio.gather(
            *(_call(stub, images[i * 4 : i * 4 + 4], 120) for i in range(12))
        )
        codes = [code for code, _ in results]
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert grpc.StatusCode.OK in codes
        refusal = next(d for c, d in results if c == grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "limit 8" in refusal and "retry" in refusal
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert sample(scrape(gw.metrics_port), "clip_rejected_items_total") > 0
        assert gw.embedder.admitted == 0  # everything admitted was released
        code, _ = await _call(stub, images[:2], 120)
        assert code == grpc.StatusCode.OK


async def test_callers_leaving_mid_batch_do_not_fail_the_others(vit_model: ExportedModel) -> None:
    settings = gateway_settings(vit_model.repository, max_batch_size=16, max_batch_wait_ms=200)
    images = [encode(photo_like(100, 80, seed=300 + i), "JPEG") for i in range(16)]
    module = torch.jit.load(str(vit_model.repository / "clip_image" / "1" / "model.pt"))
    spec, limits = ImageSpec(224), ImageLimits(1 << 24, 1 << 26)
    pixels = np.stack([preprocess_image_bytes(b, spec, limits) for b in images])
    with torch.no_grad():
        expected = module(torch.from_numpy(pixels)).numpy()
    async with running_gateway(settings) as gw, stub_for(gw.port) as stub:
        impatient = [asyncio.create_task(_call(stub, [images[i]], 0.25)) for i in range(0, 16, 2)]
        patient = {i: asyncio.create_task(_call(stub, [images[i]], 120)) for i in range(1, 16, 2)}
        cancelled = asyncio.create_task(_call(stub, [images[0]], 120))
        await asyncio.sleep(0.1)
        cancelled.cancel()
        late = await asyncio.gather(*impatient)
        done = {i: await task for i, task in patient.items()}
    assert all(code == grpc.StatusCode.DEADLINE_EXCEEDED for code, _ in late)
    for i, (code, reply) in done.items():
        assert code == grpc.StatusCode.OK
        got = decode_embedding(reply.embeddings[0])
        assert np.abs(got - expected[i]).max() <= 1e-5
