"""`--cache-ttl-s` (README, settings table and "Cache"): every entry the gateway writes
to Redis expires after the configured time. Real gateway, real redis-server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis as redis_client

from service.api.clip.v1 import clip_pb2
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.redis_server import RedisServer
from service.settings import Settings
from tests.support.gateway import stub_for
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

TTL_S = 4321
# Seconds that may pass between a write and the TTL read back, on the slowest machine.
SLACK_S = 120


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def test_entries_the_gateway_writes_expire_after_cache_ttl_s(
    demo_model: ExportedModel, redis_server: RedisServer
) -> None:
    assert abs(Settings().cache_ttl_s - TTL_S) > SLACK_S  # the default would be told apart
    texts = ["a red circle", "a blue star", "a green square"]
    images = [encode(photo_like(40, 40, seed=s)) for s in (1, 2)]
    settings = gateway_settings(
        demo_model.repository,
        redis_url=redis_server.url,
        cache_ttl_s=TTL_S,
        redis_timeout_s=5.0,  # not about timeouts: a slow write must not be cut short
    )
    with redis_client.Redis.from_url(redis_server.url) as redis:
        assert redis.dbsize() == 0
        async with running_gateway(settings) as gw, stub_for(gw.port) as stub:
            await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts), timeout=60)
            await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=images), timeout=60)
            # The write goes out after the answer: wait until all five are there.
            keys = await eventually(
                lambda: redis.keys("clip:*"),
                lambda found: len(found) >= len(texts) + len(images),
                what="the five vectors written to Redis",
            )
        ttls = {key: redis.ttl(key) for key in keys}
    assert all(key.startswith(b"clip:v3:") for key in ttls), sorted(ttls)
    assert all(TTL_S - SLACK_S <= ttl <= TTL_S for ttl in ttls.values()), ttls
