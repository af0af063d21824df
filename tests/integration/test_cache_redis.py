"""The embedding cache against a real redis-server: exact round trips, outages, hangs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import numpy as np
import pytest
import redis

from service.core.cache import EmbeddingCache
from service.metrics import Metrics
from service.processes.metric_samples import sample
from service.processes.redis_server import RedisServer
from tests.support.cache import cache_options
from tests.support.fakes import FakeClock

pytestmark = pytest.mark.integration


def vec(seed: int, dim: int = 8) -> np.ndarray:
    """A unit vector, as every embedding is (the shared level refuses anything else)."""
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server of the test's own, to crash, restart or pause."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_sync(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.config_resetstat()
    yield client
    client.close()


@pytest.fixture
async def make_cache() -> AsyncIterator[Callable[..., EmbeddingCache]]:
    made: list[EmbeddingCache] = []

    def make(url: str, metrics: Metrics, **kwargs: Any) -> EmbeddingCache:
        cache = EmbeddingCache(
            metrics=metrics, **cache_options({"url": url, "timeout_s": 1.0}, kwargs, None)
        )
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.aclose()


def command_calls(client: redis.Redis, command: str) -> int:
    stats = cast(dict[str, Any], client.info("commandstats"))
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_redis_round_trip_is_exact_and_has_a_ttl(
    redis_server: RedisServer,
    redis_sync: redis.Redis,
    make_cache: Callable[..., EmbeddingCache],
) -> None:
    metrics = Metrics()
    cache = make_cache(redis_server.url, metrics, ttl_s=600)
    # Signed zero, a subnormal and a value that is not exactly representable: a unit vector.
    tricky = np.array([0.0, -0.0, 1e-45, 0.6, -0.8, 1e-4 / 3], dtype=np.float32)
    vectors = {f"k{i}": v for i, v in enumerate([tricky, vec(1, 512), vec(2, 1)])}
    await cache.put_many(list(vectors.items()), truncated=[True, False, False])
    got = await cache.get_many(list(vectors))  # LRU disabled: this comes from Redis
    for key, value in zip(vectors, got, strict=True):
        assert value is not None
        assert value.vector.dtype == np.float32 and value.vector.ndim == 1
        assert value.vector.tobytes() == vectors[key].tobytes()
        assert 0 < redis_sync.ttl(key) <= 600
    assert [v.truncated for v in got if v is not None] == [True, False, False]
    # A flags byte (bit 0: truncated), then raw little-endian float32: any client reads it.
    assert redis_sync.get("k0") == b"\x01" + tricky.astype("<f4").tobytes()
    assert sample(metrics.registry, "clip_cache_hits_total", level="redis") == 3
    assert sample(metrics.registry, "clip_cache_errors_total", level="redis") == 0


async def test_one_mget_per_get_and_one_pipeline_per_put(
    redis_server: RedisServer,
    redis_sync: redis.Redis,
    make_cache: Callable[..., EmbeddingCache],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = make_cache(redis_server.url, Metrics())
    client = cache._client
    assert client is not None
    pipelines: list[object] = []
    real_pipeline = client.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        pipelines.append(pipe)
        return pipe

    monkeypatch.setattr(client, "pipeline", counting_pipeline)
    entries = [(f"k{i}", vec(i)) for i in range(20)]
    await cache.put_many(entries)
    assert len(pipelines) == 1
    assert command_calls(redis_sync, "set") == 20
    await cache.get_many([key for key, _ in entries] + ["missing", "k0"])
    assert command_calls(redis_sync, "mget") == 1
    assert command_calls(redis_sync, "get") == 0


async def test_corrupt_value_in_real_redis(
    redis_server: RedisServer,
    redis_sync: redis.Redis,
    make_cache: Callable[..., EmbeddingCache],
) -> None:
    metrics = Metrics()
    cache = make_cache(redis_server.url, metrics)
    redis_sync.set("bad", b"\x01\x02\x03")
    assert await cache.get_many(["bad"]) == [None]
    assert sample(metrics.registry, "clip_cache_corrupt_total") == 1
    assert sample(metrics.registry, "clip_cache_errors_total", level="redis") == 0
    assert sample(metrics.registry, "clip_cache_misses_total", level="redis") == 1


async def test_pooled_connections_survive_a_redis_restart(
    own_redis: RedisServer,
    make_cache: Callable[..., EmbeddingCache],
) -> None:
    metrics = Metrics()
    cache = make_cache(own_redis.url, metrics)
    await cache.put_many([("k", vec(1))])
    # Several concurrent calls leave several connections in the pool.
    await asyncio.gather(*(cache.get_many(["k"]) for _ in range(8)))
    own_redis.restart()  # every pooled socket is now dead
    await cache.put_many([("k", vec(2))])
    results = await asyncio.gather(*(cache.get_many(["k"]) for _ in range(8)))
    for (value,) in results:
        assert value is not None and np.array_equal(value.vector, vec(2))
    assert sample(metrics.registry, "clip_cache_errors_total", level="redis") == 0


async def test_redis_outage_never_reaches_the_caller_and_recovery(
    own_redis: RedisServer,
    make_cache: Callable[..., EmbeddingCache],
) -> None:
    metrics = Metrics()
    clock = FakeClock()
    # The outage is a kill: the port is closed, so each call is refused at once (one
    # immediate retry, then ConnectionError) and the timeout never ends one. 5 s only
    # keeps the calls that must succeed from timing out on a loaded machine.
    cache = make_cache(
        own_redis.url,
        metrics,
        local_items=0,
        timeout_s=5.0,
        breaker_failures=3,
        breaker_reset_s=5.0,
        clock=clock,
    )
    for i in range(30):
        if i == 10:
            own_redis.stop(kill=True)  # a crash, mid-loop
        await cache.put_many([(f"k{i}", vec(i))])
        (value,) = await cache.get_many([f"k{i}"])
        assert (value is not None) == (i < 10)
    errors = sample(metrics.registry, "clip_cache_errors_total", level="redis")
    assert errors == 3  # then the breaker stopped the calls
    assert sample(metrics.registry, "clip_cache_breaker_open") == 1

    own_redis.restart()
    await cache.put_many([("after", vec(99))])
    assert await cache.get_many(["after"]) == [None]  # still open: Redis skipped
    assert sample(metrics.registry, "clip_cache_errors_total", level="redis") == errors

    clock.advance(5.0)
    await cache.put_many([("after", vec(99))])  # the half-open trial
    assert sample(metrics.registry, "clip_cache_breaker_open") == 0
    (value,) = await cache.get_many(["after"])
    assert value is not None and np.array_equal(value.vector, vec(99))
    assert sample(metrics.registry, "clip_cache_errors_total", level="redis") == errors


async def test_hung_redis_times_out_and_no_stale_reply_is_read_later(
    own_redis: RedisServer,
    make_cache: Callable[..., EmbeddingCache],
) -> None:
    metrics = Metrics()
    clock = FakeClock()
    cache = make_cache(
        own_redis.url, metrics, timeout_s=0.1, breaker_failures=2, breaker_reset_s=5.0, clock=clock
    )
    await cache.put_many([("a", vec(1)), ("b", vec(2))])
    # A cache on the same server with a 5 s timeout: its call begins first and must
    # still be waiting when both of ours (0.1 s each) were cut. Timers fire in order, so
    # this holds on any machine that does not stall ~5 s; no wall-clock bound.
    patient = make_cache(own_redis.url, Metrics(), timeout_s=5.0)
    await patient.put_many([("p", vec(4))])  # connected before the pause
    own_redis.pause()
    try:
        waiting = asyncio.create_task(patient.get_many(["p"]))
        await asyncio.sleep(0)  # its timeout has started
        assert await cache.get_many(["a"]) == [None]
        await cache.put_many([("c", vec(3))])
        assert not waiting.done()
        assert sample(metrics.registry, "clip_cache_errors_total", level="redis") == 2
        assert sample(metrics.registry, "clip_cache_breaker_open") == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        own_redis.resume()
    # The MGET for "a" is answered now, on a socket redis-py must have dropped:
    # reading "b" must give b's vector, never the late reply meant for "a".
    clock.advance(5.0)
    (value,) = await cache.get_many(["b"])
    assert value is not None and np.array_equal(value.vector, vec(2))
    assert sample(metrics.registry, "clip_cache_breaker_open") == 0


def test_redis_server_helper_leaves_nothing_running() -> None:
    server = RedisServer()
    with server:
        first_port = server.port
        assert server.running
        server.restart()
        assert server.port == first_port and server.running
        process = server._process
        assert process is not None
        server.pause()  # stopping a paused server must still end it
    assert not server.running
    assert process.poll() is not None
