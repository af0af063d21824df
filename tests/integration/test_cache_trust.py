"""A cache that cannot lie: invalid shared values are misses, flags survive, bounds hold.

Real redis-server and a real gateway over gRPC (issue 14, items 2 and 3).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis as redis_sync

from service.client import AsyncClipClient, Embeddings
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample, scrape
from service.processes.redis_server import RedisServer
from service.server.app import Gateway
from tests.support.cache import until_cached
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration

# Past the 77-token context: the text is cut and `truncated` is set.
LONG_TEXT = "a photo of " + " ".join(f"word{i}" for i in range(120))


@pytest.fixture
async def gateway(demo_model: ExportedModel, redis_server: RedisServer) -> AsyncIterator[Gateway]:
    redis_sync.Redis.from_url(redis_server.url).flushall()
    # No LRU: every lookup reads Redis, so what Redis holds is what callers get.
    settings = gateway_settings(
        demo_model.repository, redis_url=redis_server.url, local_cache_items=0
    )
    async with running_gateway(settings) as gw:
        yield gw


async def _cached_text(
    client: AsyncClipClient, redis_server: RedisServer, text: str
) -> tuple[Embeddings, bytes, redis_sync.Redis]:
    """Embed `text` until Redis holds it (no write of it pending, so a later write cannot
    replace what the test puts there); its first answer, its only key and a raw client."""
    first = await client.embed_text([text])
    await until_cached(lambda: client.embed_text([text]))
    raw = redis_sync.Redis.from_url(redis_server.url)
    keys = raw.keys("clip:*:emb:*:text:*")
    assert len(keys) == 1, keys
    return first, keys[0], raw


async def test_a_short_value_under_a_real_key_is_a_counted_miss_and_is_overwritten(
    gateway: Gateway, redis_server: RedisServer
) -> None:
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        first, key, raw = await _cached_text(client, redis_server, "a red circle")
        raw.set(key, b"\x00\x00\x80\x3f")  # 4 bytes: once made EmbedText answer dim 1
        lied = await client.embed_text(["a red circle"])
        assert lied.vectors.shape == first.vectors.shape
        np.testing.assert_array_equal(lied.vectors, first.vectors)
        assert lied.cached == [False]  # recomputed, not served from the bad value
        assert sample(scrape(gateway.metrics_port), "clip_cache_corrupt_total") == 1
        # The recomputed value replaces the bad one: a repeat is served from Redis (not
        # only shared with the recomputation while its write is pending), and no later
        # read found the bad value again.
        again = await until_cached(lambda: client.embed_text(["a red circle"]))
        np.testing.assert_array_equal(again.vectors, first.vectors)
        assert len(raw.get(key)) == 1 + 4 * first.vectors.shape[1]  # overwritten
        assert sample(scrape(gateway.metrics_port), "clip_cache_corrupt_total") == 1


async def test_a_right_length_value_that_is_not_a_unit_vector_is_refused(
    gateway: Gateway, redis_server: RedisServer
) -> None:
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        first, key, raw = await _cached_text(client, redis_server, "a blue star")
        dim = first.vectors.shape[1]
        raw.set(key, b"\x00" + np.full(dim, 7.0, dtype="<f4").tobytes())
        second = await client.embed_text(["a blue star"])
    np.testing.assert_array_equal(second.vectors, first.vectors)
    assert sample(scrape(gateway.metrics_port), "clip_cache_corrupt_total") == 1


async def test_truncated_survives_a_cache_hit(gateway: Gateway) -> None:
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        first = await client.embed_text([LONG_TEXT, "short"])
        # An immediate repeat may share the first computation while its Redis write is
        # pending (cached=False): repeat until Redis answers.
        second = await until_cached(lambda: client.embed_text([LONG_TEXT, "short"]))
    assert first.cached == [False, False] and second.cached == [True, True]
    assert first.truncated == [True, False]
    assert second.truncated == [True, False]


async def test_truncated_survives_an_in_memory_cache_hit(demo_model: ExportedModel) -> None:
    """The in-process LRU keeps the flag too (the test above runs with the LRU off)."""
    settings = gateway_settings(demo_model.repository, local_cache_items=1000)
    async with (
        running_gateway(settings) as gw,
        AsyncClipClient(f"127.0.0.1:{gw.port}") as client,
    ):
        first = await client.embed_text([LONG_TEXT, "short"])
        second = await until_cached(lambda: client.embed_text([LONG_TEXT, "short"]))
    assert first.truncated == [True, False]
    assert second.cached == [True, True]
    assert second.truncated == [True, False]
