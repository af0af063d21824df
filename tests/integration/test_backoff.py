"""Load refusals say when to come back, on both transports, and the clients wait and succeed.

The backend sits behind a gate (`tests.support.gate`), so the admission bound is full
for exactly as long as the test needs.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import grpc
import openai
import pytest

from service.api.clip.v1 import clip_pb2
from service.client import AsyncClipClient, ClipClient, RetryPolicy
from service.processes.gateway import gateway_settings
from service.processes.metric_samples import sample, scrape
from service.server.app import Gateway
from tests.support.gate import Gate, gated_gateway
from tests.support.gateway import stub_for
from tests.support.http_json import image_input
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

_LIMIT = 4


def _post(port: int, body: Any) -> tuple[int, dict[str, str], Any]:
    """POST `body` to /v1/embeddings: status, headers (lower-cased names), JSON answer."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/embeddings",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            return response.status, headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        headers = {k.lower(): v for k, v in exc.headers.items()}
        return exc.code, headers, json.loads(exc.read())


def _rejected(gw: Gateway) -> float:
    return sample(scrape(gw.metrics_port), "clip_rejected_items_total")


async def _fill(gw: Gateway, gate: Gate, stub: Any, images: list[bytes]) -> asyncio.Task[Any]:
    """A call that takes the whole admission bound and is held at the closed gate."""
    gate.close()

    async def call() -> Any:
        return await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=images))

    held = asyncio.create_task(call())
    await eventually(lambda: gw.embedder.admitted, lambda n: n == _LIMIT, what="bound full")
    await gate.wait_waiting(1)
    return held


async def test_refusals_carry_a_retry_hint_and_clients_wait_then_succeed(
    demo_model: ExportedModel,
) -> None:
    settings = gateway_settings(
        demo_model.repository,
        max_queued_items=_LIMIT,
        max_batch_size=_LIMIT,
        backend_timeout_s=600,
        local_cache_items=0,
    )
    images = [encode(photo_like(64, 64, seed=700 + i), "PNG") for i in range(8 + _LIMIT)]
    gate = Gate()
    async with gated_gateway(settings, gate) as gw, stub_for(gw.port) as stub:
        held = await _fill(gw, gate, stub, images[:_LIMIT])

        # gRPC: RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms` in the trailers.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[images[4]]), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(refused.value.trailing_metadata() or ())
        assert 100 <= int(trailers["grpc-retry-pushback-ms"]) <= 30_000, trailers
        # More items than the bound holds: waiting will not help, so no hint.
        with pytest.raises(grpc.aio.AioRpcError) as never:
            request = clip_pb2.EmbedImageRequest(images=images[7 : 8 + _LIMIT])
            await stub.EmbedImage(request, timeout=30)
        assert never.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "grpc-retry-pushback-ms" not in dict(never.value.trailing_metadata() or ())

        # HTTP: 429 with Retry-After (whole seconds) and retry-after-ms.
        status, headers, answer = await asyncio.to_thread(
            _post, gw.http_port, {"model": "clip", "input": [image_input(images[4])]}
        )
        assert status == 429 and answer["error"]["code"] == "RESOURCE_EXHAUSTED", answer
        assert int(headers["retry-after"]) >= 1 and 100 <= int(headers["retry-after-ms"]), headers
        status, headers, _ = await asyncio.to_thread(
            _post,
            gw.http_port,
            {"model": "clip", "input": [f"text {i}" for i in range(_LIMIT + 1)]},
        )
        assert status == 429 and "retry-after" not in headers

        async with AsyncClipClient(f"127.0.0.1:{gw.port}", timeout_s=120) as client:
            # A client whose timeout is shorter than the hint does not sleep past it: the
            # refusal comes back as it is, not as a deadline.
            async with AsyncClipClient(f"127.0.0.1:{gw.port}", timeout_s=0.5) as hasty:
                with pytest.raises(grpc.aio.AioRpcError) as gave_up:
                    await hasty.embed_image([images[5]])
            assert gave_up.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            async with AsyncClipClient(
                f"127.0.0.1:{gw.port}", retry=RetryPolicy(max_attempts=1)
            ) as no_retries:
                with pytest.raises(grpc.aio.AioRpcError):
                    await no_retries.embed_image([images[5]])

            # The client: refused, waits the hint, tries again, and gets its answer once
            # the held work is done.
            before = await asyncio.to_thread(_rejected, gw)
            call = asyncio.create_task(client.embed_image([images[6]]))
            await eventually(
                lambda: _rejected(gw), lambda n: n > before, what="refused", blocking=True
            )
            assert not call.done()
            gate.open()
            embedded = await call
            assert embedded.vectors.shape == (1, gw.embedder.metadata.embedding_dim)
            assert (await held).embeddings

        # The blocking client, and the official openai client (it reads retry-after-ms),
        # honour the hint too and succeed.
        held = await _fill(gw, gate, stub, images[:_LIMIT])
        before = await asyncio.to_thread(_rejected, gw)

        def blocking_call() -> Any:
            with ClipClient(f"127.0.0.1:{gw.port}", timeout_s=120) as sync_client:
                return sync_client.embed_image([images[7]])

        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{gw.http_port}/v1", api_key="unused", max_retries=5
        ) as openai_client:
            calls = [
                asyncio.create_task(asyncio.to_thread(blocking_call)),
                asyncio.create_task(
                    openai_client.embeddings.create(model="clip", input=["a red circle"])
                ),
            ]
            await eventually(
                lambda: _rejected(gw), lambda n: n >= before + 2, what="refused", blocking=True
            )
            assert not any(c.done() for c in calls)
            gate.open()
            sync_answer, openai_answer = await asyncio.gather(*calls)
        assert sync_answer.vectors.shape == (1, gw.embedder.metadata.embedding_dim)
        assert len(openai_answer.data) == 1
        await held
