"""What a gateway shows and refuses while work is held in its backend (README: the
`clip_queued_items` gauge the gateway HPA scales on; HTTP 429 past
`--max-concurrent-rpcs`; one `--max-inflight-request-bytes` budget for gRPC and HTTP).

The backend sits behind a gate (`tests.support.gate`): calls stay in flight for as
long as the test needs, so the queue and the in-flight calls are known, not hoped for.
Real gateway, real gRPC and HTTP over loopback, metrics read from its /metrics page.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from PIL import Image

from service.api.clip.v1 import clip_pb2
from service.processes.gateway import gateway_settings
from service.processes.metric_samples import sample, scrape
from tests.support.gate import Gate, gated_gateway
from tests.support.gateway import stub_for
from tests.support.http_json import http_json, image_input
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.polling import metric_reads

pytestmark = pytest.mark.integration


def _images(n: int, seed: int) -> list[bytes]:
    """`n` different small PNGs (different inputs: none is deduplicated or cached)."""
    return [encode(photo_like(48, 40, seed=seed + i)) for i in range(n)]


async def test_queued_items_gauge_counts_items_waiting_for_the_backend(
    demo_model: ExportedModel,
) -> None:
    settings = gateway_settings(demo_model.repository)
    gate = Gate()
    async with gated_gateway(settings, gate) as gw, stub_for(gw.port) as stub:
        assert sample(scrape(gw.metrics_port), "clip_queued_items") == 0  # warm, idle
        gate.close()
        first = asyncio.ensure_future(
            stub.EmbedImage(clip_pb2.EmbedImageRequest(images=_images(3, 10)), timeout=300)
        )
        await gate.wait_waiting(1)  # its batch of 3 is held in the backend
        await metric_reads(gw.metrics_port, "clip_queued_items", 3, what="3 items queued")
        second = asyncio.ensure_future(
            stub.EmbedImage(clip_pb2.EmbedImageRequest(images=_images(2, 20)), timeout=300)
        )
        await gate.wait_queued(5)  # 2 more wait in the batching queue behind it
        await metric_reads(gw.metrics_port, "clip_queued_items", 5, what="5 items queued")
        assert not first.done() and not second.done()
        gate.open()
        answers = await asyncio.gather(first, second)
        assert [len(a.embeddings) for a in answers] == [3, 2]
        await metric_reads(gw.metrics_port, "clip_queued_items", 0, what="the queue empty again")


async def test_http_calls_past_max_concurrent_rpcs_get_an_openai_shaped_429(
    demo_model: ExportedModel,
) -> None:
    settings = gateway_settings(demo_model.repository, max_concurrent_rpcs=2)
    gate = Gate()
    blobs = _images(2, 30)
    async with gated_gateway(settings, gate) as gw:
        port = gw.http_port
        assert port
        gate.close()
        held = [
            asyncio.ensure_future(
                asyncio.to_thread(http_json, port, "/v1/embeddings", {"input": [image_input(b)]})
            )
            for b in blobs
        ]
        # Both calls have reached the batching queue: each holds an HTTP slot.
        await gate.wait_queued(2)
        for path, body in (
            ("/v1/embeddings", {"input": ["a red circle"]}),  # would not even be gated
            ("/v1/models", None),
        ):
            status, answer = await asyncio.to_thread(http_json, port, path, body)
            assert status == 429, (path, status, answer)
            assert set(answer) == {"error"}
            error = answer["error"]
            assert set(error) == {"message", "type", "code"}
            assert error["type"] == "rate_limit_error" and error["code"] == "RESOURCE_EXHAUSTED"
            assert "--max-concurrent-rpcs" in error["message"] and "limit 2" in error["message"]
        assert not any(call.done() for call in held)
        refused = sample(scrape(gw.metrics_port), "clip_requests_total", code="RESOURCE_EXHAUSTED")
        assert refused == 2
        gate.open()
        for call in held:
            status, answer = await call
            assert status == 200 and len(answer["data"]) == 1
        # The slots are given back: the refused call now runs.
        status, answer = await asyncio.to_thread(
            http_json, port, "/v1/embeddings", {"input": ["a red circle"]}
        )
        assert status == 200 and len(answer["data"]) == 1


def _noise_pngs(n: int, seed: int) -> list[bytes]:
    """PNGs of noise (~100 KB each: noise does not compress)."""
    rng = np.random.default_rng(seed)
    return [
        encode(Image.fromarray(rng.integers(0, 256, (180, 180, 3), dtype=np.uint8)), "PNG")
        for _ in range(n)
    ]


async def test_grpc_and_http_share_the_inflight_request_byte_budget(
    demo_model: ExportedModel,
) -> None:
    limit = 150_000
    blobs = _noise_pngs(4, 5)
    # Each request fits the budget alone (an HTTP body carries its image as base64: 4/3
    # of it); any two together do not.
    assert all(limit / 2 < len(b) and len(b) * 4 / 3 + 200 < limit for b in blobs)
    settings = gateway_settings(demo_model.repository, max_inflight_request_bytes=limit)
    gate = Gate()
    async with gated_gateway(settings, gate) as gw, stub_for(gw.port) as stub:
        port = gw.http_port
        assert port

        def post(blob: bytes) -> tuple[int, dict]:
            return http_json(port, "/v1/embeddings", {"input": [image_input(blob)]})

        # A gRPC call held in the backend: an HTTP call over what is left is refused.
        gate.close()
        held = asyncio.ensure_future(
            stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[blobs[0]]), timeout=300)
        )
        await gate.wait_waiting(1)
        status, answer = await asyncio.to_thread(post, blobs[1])
        assert status == 429, answer
        assert answer["error"]["code"] == "RESOURCE_EXHAUSTED"
        assert "--max-inflight-request-bytes" in answer["error"]["message"]
        gate.open()
        assert len((await held).embeddings) == 1
        await metric_reads(
            gw.metrics_port, "clip_inflight_request_bytes", 0, what="the gRPC call's bytes let go"
        )

        # And the other way: an HTTP call held in the backend, a gRPC call refused.
        gate.close()
        held_http = asyncio.ensure_future(asyncio.to_thread(post, blobs[2]))
        await gate.wait_waiting(1)
        level = sample(scrape(gw.metrics_port), "clip_inflight_request_bytes")
        assert len(blobs[2]) * 4 / 3 <= level < limit, level
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[blobs[3]]), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-inflight-request-bytes" in (err.value.details() or "")
        gate.open()
        status, answer = await held_http
        assert status == 200 and len(answer["data"]) == 1
        await metric_reads(
            gw.metrics_port, "clip_inflight_request_bytes", 0, what="the HTTP call's bytes let go"
        )

        # Alone, each refused request runs: it was refused for the other one's bytes.
        status, answer = await asyncio.to_thread(post, blobs[1])
        assert status == 200 and len(answer["data"]) == 1
        alone = await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[blobs[3]]), timeout=120)
        assert len(alone.embeddings) == 1


async def test_calls_without_a_deadline_end_at_backend_timeout_s(
    demo_model: ExportedModel,
) -> None:
    """README: a call without a deadline gets `--backend-timeout-s`. With the backend held,
    a deadline-less gRPC call ends DEADLINE_EXCEEDED and an HTTP call 504 (OpenAI shape),
    each backend call having been given at most that timeout; a gateway that waited for
    the backend instead would hang them (the 120 s bound only catches that)."""
    # Long enough for decode and the batching queue on a slow loaded machine to reach the
    # gate first; the closed gate is what makes the calls miss it.
    timeout_s = 8.0
    settings = gateway_settings(demo_model.repository, backend_timeout_s=timeout_s)
    gate = Gate()
    grpc_blob, http_blob = _images(2, 40)
    async with gated_gateway(settings, gate) as gw, stub_for(gw.port) as stub:
        warm_up_calls = len(gate.gated_calls())
        gate.close()

        async def grpc_call() -> grpc.StatusCode:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[grpc_blob]))
            return err.value.code()

        grpc_code, (http_status, http_body) = await asyncio.wait_for(
            asyncio.gather(
                grpc_call(),
                asyncio.to_thread(
                    http_json, gw.http_port, "/v1/embeddings", {"input": [image_input(http_blob)]}
                ),
            ),
            120.0,
        )
        held = gate.gated_calls()[warm_up_calls:]
        gate.open()
    assert grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert http_status == 504, http_body
    assert http_body["error"]["code"] == "DEADLINE_EXCEEDED"
    # One batch is held at the gate; the other item is in it, or waits in the queue
    # behind it (one batch in flight at a time) and ends there.
    assert 1 <= sum(call.rows for call in held) <= 2, held
    # Within the callers' time (gRPC core may round a `grpc-timeout` header up a little).
    assert all(c.timeout_s is not None and 0 < c.timeout_s <= timeout_s + 0.5 for c in held), held
