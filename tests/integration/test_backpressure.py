"""Bounded in-flight work and callers that leave mid-batch.

The backend sits behind a gate (`tests.support.gate`): work is held in the backend
for as long as the test needs, so nothing here depends on the machine being slow
enough for calls to still be running (or fast enough to be done) at some moment.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from service.api.clip.v1 import clip_pb2
from service.client import decode_embedding
from service.processes.gateway import gateway_settings
from service.processes.metric_samples import sample, scrape
from tests.support.gate import Gate, gated_gateway
from tests.support.gateway import stub_for
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.polling import eventually
from tests.support.reference import exported_image_vectors

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


async def test_queue_bound_refuses_at_once_and_recovers(demo_model: ExportedModel) -> None:
    limit = 8
    settings = gateway_settings(
        demo_model.repository, max_queued_items=limit, max_batch_size=4, backend_timeout_s=600
    )
    images = [encode(photo_like(64, 64, seed=100 + i), "PNG") for i in range(16)]
    gate = Gate()
    async with gated_gateway(settings, gate) as gw, stub_for(gw.port) as stub:
        gate.close()
        # Two calls of four fill the bound exactly; the backend holds them.
        held = [asyncio.create_task(_call(stub, images[i * 4 : i * 4 + 4], 300)) for i in range(2)]
        await eventually(lambda: gw.embedder.admitted, lambda n: n == limit, what="8 admitted")
        await gate.wait_waiting(1)
        # Past the bound: refused at once, while the admitted work is still held (a call
        # that waited for room would meet its deadline, generous for an answer at once).
        for i in range(2, 4):
            code, details = await _call(stub, images[i * 4 : i * 4 + 4], 30)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert f"limit {limit}" in details and "retry" in details
        code, _ = await _call(stub, images[8:9], 30)  # one more item does not fit either
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not any(task.done() for task in held) and gw.embedder.admitted == limit
        rejected = await eventually(
            lambda: sample(scrape(gw.metrics_port), "clip_rejected_items_total"),
            lambda n: n == 9,
            what="9 rejected items counted",
            blocking=True,
        )
        assert rejected == 9
        gate.open()
        results = await asyncio.gather(*held)
        assert [code for code, _ in results] == [grpc.StatusCode.OK] * 2
        assert gw.embedder.admitted == 0  # everything admitted was released
        code, reply = await _call(stub, images[8:16], 300)  # room again: a full bound's worth
        assert code == grpc.StatusCode.OK and len(reply.embeddings) == 8


async def test_callers_leaving_mid_batch_do_not_fail_the_others(
    demo_model: ExportedModel,
) -> None:
    settings = gateway_settings(
        demo_model.repository, max_batch_size=32, local_cache_items=0, backend_timeout_s=600
    )
    images = [encode(photo_like(100, 80, seed=300 + i), "JPEG") for i in range(18)]
    expected = exported_image_vectors(demo_model, images)
    gate = Gate()
    async with gated_gateway(settings, gate) as gw, stub_for(gw.port) as stub:
        gate.close()
        # A first call takes the model (one batch at a time), so the next 17 callers queue
        # up behind it and then go to the backend together, as one batch.
        queued_before = gate.arrivals["image"]  # the warm-up's
        held_before = len(gate.gated_calls())
        first = asyncio.create_task(_call(stub, [images[17]], 300))
        await gate.wait_calls(held_before + 1)
        # Long enough for the batch below to form on the slowest machine (the wait for it
        # is event-driven); the gate then holds the batch past it on any machine.
        impatient_s = 10.0
        impatient = [
            asyncio.create_task(_call(stub, [images[i]], impatient_s)) for i in range(0, 16, 2)
        ]
        patient = {i: asyncio.create_task(_call(stub, [images[i]], 300)) for i in range(1, 16, 2)}
        cancelled = asyncio.create_task(_call(stub, [images[16]], 300))
        await gate.wait_queued(queued_before + 18)  # decoded, and waiting behind the first
        gate.allow(1)  # the first call's batch runs; the next batch forms and is held
        assert (await first)[0] == grpc.StatusCode.OK
        await gate.wait_calls(held_before + 2)
        assert gate.gated_calls()[-1].rows == 17, gate.calls  # all 17 callers in one batch
        assert not any(t.done() for t in [*impatient, *patient.values(), cancelled])
        cancelled.cancel()
        late = await asyncio.gather(*impatient)  # their deadlines pass inside the batch
        assert gate.waiting == 1, "the batch was still held when they left"
        gate.open()
        done = {i: await task for i, task in patient.items()}
    assert all(code == grpc.StatusCode.DEADLINE_EXCEEDED for code, _ in late), late
    assert cancelled.cancelled()
    for i, (code, reply) in done.items():
        assert code == grpc.StatusCode.OK, reply
        got = decode_embedding(reply.embeddings[0])
        assert np.abs(got - expected[i]).max() <= 1e-5
