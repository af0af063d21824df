"""`/metrics` parses with prometheus-client's parser and each family moves when it should."""

from __future__ import annotations

import grpc
import pytest

from service.api.clip.v1 import clip_pb2
from service.client import AsyncClipClient
from service.processes.metric_samples import sample, scrape
from service.server.app import Gateway
from tests.support.gateway import stub_for
from tests.support.images import encode, photo_like
from tests.support.polling import eventually

pytestmark = pytest.mark.integration


async def test_every_family_moves(gateway: Gateway) -> None:
    before = scrape(gateway.metrics_port)
    image = encode(photo_like(90, 60, seed=5), "PNG")
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        await client.embed_text(["metrics one", "metrics two"])
        await client.embed_text(["metrics one"])  # a local-cache hit
        await client.embed_image([image])
    async with stub_for(gateway.port) as stub:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[b"junk"]))
    calls = (("EmbedText", "OK", 2), ("EmbedImage", "OK", 1), ("EmbedImage", "INVALID_ARGUMENT", 1))

    def counted(samples: dict[str, float]) -> bool:
        return all(
            sample(samples, "clip_requests_total", method=m, code=c)
            - sample(before, "clip_requests_total", method=m, code=c)
            >= n
            for m, c, n in calls
        )

    # A call is counted as the interceptor finishes, which may be just after the caller
    # has its answer: wait for the counts (scraping in a thread, so the server runs).
    after = await eventually(
        lambda: scrape(gateway.metrics_port), counted, what="every call counted", blocking=True
    )

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("clip_requests_total", method="EmbedText", code="OK") == 2
    assert moved("clip_requests_total", method="EmbedImage", code="OK") == 1
    assert moved("clip_requests_total", method="EmbedImage", code="INVALID_ARGUMENT") == 1
    assert moved("clip_request_duration_seconds_count", method="EmbedText") == 2
    assert moved("clip_items_embedded_total", modality="text") == 3
    assert moved("clip_items_embedded_total", modality="image") == 2
    assert moved("clip_cache_hits_total", level="local") >= 1
    assert moved("clip_cache_misses_total", level="local") >= 3
    assert moved("clip_backend_duration_seconds_count", backend="embedded", modality="text") >= 1
    assert moved("clip_batch_size_sum", modality="text") == 2
    assert moved("clip_queue_wait_seconds_count", modality="image") == 1
    assert moved("clip_preprocess_duration_seconds_count", stage="image_decode") == 2
    assert moved("clip_preprocess_duration_seconds_count", stage="tokenize") >= 1
    assert sample(after, "clip_requests_in_flight", method="EmbedText") == 0
    build = [k for k in after if k.startswith("clip_build_info{")]
    assert len(build) == 1 and gateway.embedder.model_id in build[0]
    assert after[build[0]] == 1


async def test_metric_names_follow_conventions(gateway: Gateway) -> None:
    samples = scrape(gateway.metrics_port)
    names = {key.split("{", 1)[0] for key in samples}
    ours = {n for n in names if n.startswith("clip_")}
    assert ours, "no clip_ metrics exported"
    for name in ours:
        base = name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        base = base.removesuffix("_created")
        assert base.islower() and " " not in base
        if "duration" in base or "wait" in base:
            assert base.endswith("_seconds"), name
    # Labels only take values from small fixed sets: no ids, texts or addresses.
    for key in samples:
        if key.startswith("clip_") and "{" in key:
            assert "127.0.0.1" not in key and "metrics one" not in key
