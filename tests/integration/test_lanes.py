"""Priority lanes through a real gateway: an interactive call overtakes queued bulk work
(EmbedStream), and HTTP callers choose their lane.

The backend sits behind a gate (`tests.support.gate`): the test decides when each batch
may run, so the order of batches is observed, not raced.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from service.api.clip.v1 import clip_pb2
from service.client import AsyncClipClient
from service.processes.gateway import gateway_settings
from service.processes.metric_samples import sample
from tests.support.gate import Gate, gated_gateway
from tests.support.gateway import stub_for
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


async def test_an_unknown_priority_is_refused_on_every_rpc_and_stream_item(
    demo_model: ExportedModel,
) -> None:
    """A priority value no lane has (a newer client's, or garbage on the wire) is
    INVALID_ARGUMENT naming `priority` on each unary call; in a stream, that item alone
    is refused and the items beside it are answered."""
    settings = gateway_settings(demo_model.repository, local_cache_items=0)
    async with gated_gateway(settings, Gate()) as gw, stub_for(gw.port) as stub:
        image = encode(photo_like(64, 64, seed=99), "PNG")
        for call, request in (
            (stub.EmbedText, clip_pb2.EmbedTextRequest(texts=["a"], priority=7)),
            (stub.EmbedImage, clip_pb2.EmbedImageRequest(images=[image], priority=7)),
            (stub.Classify, clip_pb2.ClassifyRequest(images=[image], labels=["a"], priority=7)),
            (
                stub.Similarity,
                clip_pb2.SimilarityRequest(
                    queries=[clip_pb2.Item(text="a")],
                    candidates=[clip_pb2.Item(text="b")],
                    priority=7,
                ),
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(request, timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "priority" in (refused.value.details() or "")
        items = [
            clip_pb2.StreamRequest(id="ok-1", text="a red circle"),
            clip_pb2.StreamRequest(id="bad", text="a blue star", priority=-3),
            clip_pb2.StreamRequest(id="ok-2", image=image, priority=clip_pb2.PRIORITY_BULK),
        ]
        answers = {a.id: a async for a in stub.EmbedStream(iter(items), timeout=60)}
    assert answers["bad"].error.code == "INVALID_ARGUMENT"
    assert "priority" in answers["bad"].error.message
    assert answers["ok-1"].HasField("embedding") and answers["ok-2"].HasField("embedding")
