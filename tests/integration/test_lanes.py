"""Priority lanes through a real gateway: an interactive call overtakes queued bulk work
(EmbedStream), and HTTP callers choose their lane.

The backend sits behind a gate (`tests.support.gate`): the test decides when each batch
may run, so the order of batches is observed, not raced.
"""

from __future__ import annotations

import asyncio

import pytest

from service.client import AsyncClipClient
from service.processes.gateway import gateway_settings
from service.processes.metric_samples import sample
from tests.support.gate import Gate, gated_gateway
from tests.support.http_json import http_json, image_input
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration

_PATIENT_S = 120.0  # only ends a broken test


async def test_an_interactive_call_overtakes_queued_bulk_work(demo_model: ExportedModel) -> None:
    settings = gateway_settings(
        demo_model.repository, max_batch_size=2, local_cache_items=0, backend_timeout_s=600
    )
    bulk_images = [encode(photo_like(64, 64, seed=900 + i), "PNG") for i in range(8)]
    interactive_image = encode(photo_like(64, 64, seed=999), "PNG")
    gate = Gate()
    async with (
        gated_gateway(settings, gate) as gw,
        AsyncClipClient(f"127.0.0.1:{gw.port}", timeout_s=_PATIENT_S) as client,
    ):
        gate.close()
        calls, arrivals = len(gate.gated_calls()), gate.arrivals["image"]

        async def index() -> list[tuple[str, object, object]]:
            items = [(str(i), image) for i, image in enumerate(bulk_images)]
            return [answer async for answer in client.embed_stream(items)]

        stream = asyncio.create_task(index())
        # The first bulk batch is at the gate; the other bulk items are decoded and queued.
        await gate.wait_calls(calls + 1)
        await gate.wait_queued(arrivals + len(bulk_images))
        interactive = asyncio.create_task(client.embed_image([interactive_image]))
        await gate.wait_queued(arrivals + len(bulk_images) + 1)

        gate.allow(1)  # the running bulk batch ends; the next batch is formed now
        await gate.wait_calls(calls + 2)
        assert gate.gated_calls()[calls + 1].rows == 1
        gate.allow(1)
        # The second batch was the interactive call: it is answered while every other
        # bulk item is still held (a FIFO queue would hold it behind three bulk batches).
        answer = await asyncio.wait_for(interactive, _PATIENT_S)
        assert answer.vectors.shape == (1, gw.embedder.metadata.embedding_dim)
        assert not stream.done()

        gate.open()
        indexed = await asyncio.wait_for(stream, _PATIENT_S)
        assert sorted(item_id for item_id, _, _ in indexed) == [str(i) for i in range(8)]
        assert all(error is None for _, _, error in indexed), indexed
        registry = gw.metrics.registry
        assert sample(registry, "clip_lane_batches_total", lane="interactive") >= 1
        assert sample(registry, "clip_lane_batches_total", lane="bulk") >= 4  # 8 rows, 2 a batch
        assert sample(registry, "clip_lane_queue_wait_seconds_count", lane="bulk") == 8


async def test_http_callers_choose_their_lane(demo_model: ExportedModel) -> None:
    settings = gateway_settings(demo_model.repository, local_cache_items=0, backend_timeout_s=600)
    image = image_input(encode(photo_like(64, 64, seed=1234), "PNG"))
    gate = Gate()
    async with gated_gateway(settings, gate) as gw:
        registry = gw.metrics.registry
        gate.close()
        body = {"model": "clip", "input": [image], "priority": "bulk"}
        held = asyncio.create_task(
            asyncio.to_thread(http_json, gw.http_port, "/v1/embeddings", body)
        )
        await gate.wait_waiting(1)
        assert sample(registry, "clip_lane_queued_items", lane="bulk") == 1
        assert sample(registry, "clip_lane_queued_items", lane="interactive") == 0
        gate.open()
        status, answer = await held
        assert status == 200 and len(answer["data"]) == 1
        assert sample(registry, "clip_lane_batches_total", lane="bulk") == 1

        status, answer = await asyncio.to_thread(
            http_json, gw.http_port, "/v1/embeddings", {**body, "priority": "urgent"}
        )
        assert status == 400 and "priority" in answer["error"]["message"], answer
