"""The gateway with a real redis-server: hits, isolation by model, outages, single flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import redis as redis_sync

from service.client import AsyncClipClient, Label
from service.model.export import export_model
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample, scrape
from service.processes.redis_server import RedisServer
from service.server.app import Gateway
from tests.support.cache import until_cached
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration

# Bounds that only end a broken test: what they bound takes well under a second.
PATIENT_S = 120.0


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, different (random) weights: a different weights hash."""
    out = tmp_path_factory.mktemp("other")
    export_model("clip-demo-shapes", "none", out, progress=False)
    return out


def _settings(repository: Path, redis_server: RedisServer, **extra: object) -> object:
    # The in-process LRU is off so every lookup has to go through Redis. These tests are
    # not about the Redis timeout: on a loaded machine one round trip can take longer
    # than the default 0.1 s, and a write cut short would look like a lost entry.
    return gateway_settings(
        repository,
        redis_url=redis_server.url,
        local_cache_items=0,
        redis_timeout_s=5.0,
        redis_breaker_reset_s=0.5,
        **extra,
    )


@pytest.fixture(scope="module")
async def gateway(demo_model: ExportedModel, redis_server: RedisServer) -> AsyncIterator[Gateway]:
    async with running_gateway(_settings(demo_model.repository, redis_server)) as gw:
        yield gw


def _backend_rows(gw: Gateway, modality: str) -> float:
    return sample(scrape(gw.metrics_port), "clip_batch_size_sum", modality=modality)


async def test_repeats_come_from_redis_and_are_identical(gateway: Gateway) -> None:
    image = encode(photo_like(120, 90, seed=42), "JPEG")
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        text1 = await client.embed_text(["a redis cached text"])
        image1 = await client.embed_image([image])
        rows_text, rows_image = _backend_rows(gateway, "text"), _backend_rows(gateway, "image")
        text2 = await until_cached(lambda: client.embed_text(["a redis cached text"]))
        image2 = await until_cached(lambda: client.embed_image([image]))
    assert text1.cached == [False] and image1.cached == [False]
    np.testing.assert_array_equal(text1.vectors, text2.vectors)
    np.testing.assert_array_equal(image1.vectors, image2.vectors)
    assert _backend_rows(gateway, "text") == rows_text
    assert _backend_rows(gateway, "image") == rows_image
    samples = scrape(gateway.metrics_port)
    assert sample(samples, "clip_cache_hits_total", level="redis") >= 2


async def test_other_weights_never_hit_these_entries(
    gateway: Gateway, other_weights: Path, redis_server: RedisServer
) -> None:
    text = "shared redis, different models"
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        ours = await client.embed_text([text])
    async with running_gateway(_settings(other_weights, redis_server)) as other:
        assert other.embedder.model_id != gateway.embedder.model_id
        async with AsyncClipClient(f"127.0.0.1:{other.port}") as client:
            theirs = await client.embed_text([text])
            await until_cached(lambda: client.embed_text([text]))
    assert theirs.cached == [False]
    assert np.abs(ours.vectors - theirs.vectors).max() > 1e-3


async def test_identical_concurrent_misses_reach_the_backend_once(gateway: Gateway) -> None:
    image = encode(photo_like(200, 150, seed=77), "PNG")
    before = _backend_rows(gateway, "image")
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        results = await asyncio.gather(*(client.embed_image([image, image]) for _ in range(16)))
    assert _backend_rows(gateway, "image") - before == 1
    for result in results:
        np.testing.assert_array_equal(result.vectors[0], results[0].vectors[1])


async def test_redis_outage_fails_nothing_and_recovers(
    gateway: Gateway, redis_server: RedisServer
) -> None:
    errors_before = sample(scrape(gateway.metrics_port), "clip_cache_errors_total", level="redis")
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        redis_server.stop(kill=True)
        results = []
        for i in range(12):  # every call must still succeed, without the cache
            results.append(await client.embed_text([f"during the outage {i}", "same"]))
        samples = scrape(gateway.metrics_port)
        assert sample(samples, "clip_cache_errors_total", level="redis") > errors_before
        assert sample(samples, "clip_cache_breaker_open") == 1
        redis_server.restart()
        # Recovered once a vector stored after the restart is read back from Redis. Polled,
        # not slept: the breaker's half-open trial may come before Redis accepts again.
        # The bound only ends a broken test: recovery takes a breaker period (0.5 s) or two.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENT_S
        first = await client.embed_text(["after the outage"])
        while (again := await client.embed_text(["after the outage"])).cached != [True]:
            assert loop.time() < deadline, "Redis was never used again after the outage"
            await asyncio.sleep(0.1)
    assert all(len(r.vectors) == 2 for r in results)
    assert first.cached == [False]
    np.testing.assert_array_equal(first.vectors, again.vectors)
    assert sample(scrape(gateway.metrics_port), "clip_cache_breaker_open") == 0


async def test_other_weights_never_hit_these_image_or_label_set_entries(
    gateway: Gateway, other_weights: Path, redis_server: RedisServer
) -> None:
    """Two gateways of different weights share one Redis: an image's vector and a
    Classify label set (its template ensemble) stored by one are never served by the
    other; the other answers exactly what it answers with no cache at all."""
    image = encode(photo_like(110, 80, seed=2525), "PNG")
    labels = ["a red circle", "a blue star", "a green square"]
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        ours = await client.embed_image([image])
        ours_labels = await client.classify([image], labels)
        await until_cached(lambda: client.embed_image([image]))
    stored = redis_sync.Redis.from_url(redis_server.url)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENT_S
    while len(list(stored.scan_iter("clip:*:labelset:*"))) < len(labels):
        assert loop.time() < deadline, "the label sets never reached Redis"
        await asyncio.sleep(0.05)  # poll interval, not a wait for the work
    alone = gateway_settings(other_weights, local_cache_items=0)
    async with running_gateway(alone) as gw, AsyncClipClient(f"127.0.0.1:{gw.port}") as client:
        want = await client.embed_image([image])
        want_labels = await client.classify([image], labels)
    async with (
        running_gateway(_settings(other_weights, redis_server)) as other,
        AsyncClipClient(f"127.0.0.1:{other.port}") as client,
    ):
        theirs = await client.embed_image([image])
        theirs_labels = await client.classify([image], labels)
    assert theirs.cached == [False]
    np.testing.assert_allclose(theirs.vectors, want.vectors, atol=1e-6, rtol=0)
    assert np.abs(ours.vectors - theirs.vectors).max() > 1e-3

    def scores(answer: list[list[Label]]) -> dict[str, float]:
        return {label.label: label.score for label in answer[0]}

    for label in labels:
        assert scores(theirs_labels)[label] == pytest.approx(scores(want_labels)[label], abs=1e-5)
    assert max(abs(scores(ours_labels)[x] - scores(want_labels)[x]) for x in labels) > 1e-3
