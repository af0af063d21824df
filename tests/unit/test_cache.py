"""The embedding cache and its keys, with a fake Redis and clock (real Redis: integration)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from service.core.cache import CachedVector, EmbeddingCache, encode_value
from service.core.cache_keys import embedding_key, label_set_key
from service.metrics import Metrics
from service.processes.metric_samples import sample
from service.settings import Settings
from service.wiring import build_cache
from tests.support.cache import cache_options
from tests.support.fakes import FakeClock

MODEL = "clip-demo-shapes/demo@3fa2c1d0"


# ---------------------------------------------------------------------- helpers
class FakePipeline:
    def __init__(self, owner: FakeRedis) -> None:
        self._owner = owner
        self._commands: list[tuple[str, bytes, int]] = []

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._commands.clear()

    def set(self, key: str, value: bytes, ex: int) -> None:
        self._commands.append((key, value, ex))

    async def execute(self) -> list[bool]:
        self._owner.pipelines += 1
        await self._owner.before_call()
        for key, value, _ex in self._commands:
            self._owner.data[key] = value
        return [True] * len(self._commands)


class FakeRedis:
    """Just enough of redis.asyncio.Redis; `failing` and `stall` simulate an outage."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.mget_calls = 0
        self.pipelines = 0
        self.failing = False
        self.stall: asyncio.Event | None = None

    async def before_call(self) -> None:
        if self.stall is not None:
            await self.stall.wait()
        if self.failing:
            raise RedisConnectionError("fake outage")

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        self.mget_calls += 1
        await self.before_call()
        return [self.data.get(key) for key in keys]

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        assert transaction is False
        return FakePipeline(self)

    async def aclose(self) -> None:
        pass

    @property
    def calls(self) -> int:
        return self.mget_calls + self.pipelines


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until `condition` holds (a bounded number of loop turns)."""
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def vec(seed: int, dim: int = 8) -> np.ndarray:
    """A unit vector, as every embedding is (the shared level refuses anything else)."""
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def fake_cache(
    fake: FakeRedis, metrics: Metrics, clock: Callable[[], float] | None = None, **kwargs: Any
) -> EmbeddingCache:
    return EmbeddingCache(
        metrics=metrics,
        client=cast(aioredis.Redis, fake),
        **cache_options({"url": "", "timeout_s": 1.0}, kwargs, clock),
    )


# ---------------------------------------------------------------------- keys
def test_embedding_key_names_every_input() -> None:
    base = embedding_key(MODEL, "image", b"pixels", "img:1:exif")
    assert base.startswith("clip:v3:")
    assert base == embedding_key(MODEL, "image", b"pixels", "img:1:exif")
    variants = {
        embedding_key("clip-demo-shapes/demo@ffffffff", "image", b"pixels", "img:1:exif"),
        embedding_key(MODEL, "text", b"pixels", "img:1:exif"),
        embedding_key(MODEL, "image", b"pixels", "img:2:exif"),
        embedding_key(MODEL, "image", b"pixels", ""),
        embedding_key(MODEL, "image", b"pixelz", "img:1:exif"),
    }
    assert base not in variants
    assert len(variants) == 5


def test_embedding_key_has_no_separator_ambiguity() -> None:
    payload = b"x"
    keys = [
        embedding_key("a:b", "c", payload, "d"),
        embedding_key("a", "b:c", payload, "d"),
        embedding_key("a", "b", payload, "c:d"),
        embedding_key("a", "b:c:d", payload),
        embedding_key("a%3Ab", "c", payload, "d"),
        embedding_key("a%b", "c", payload, "d"),
        embedding_key("a%25b", "c", payload, "d"),
    ]
    assert len(set(keys)) == len(keys)
    # Every key has the same number of ':'-separated parts, whatever the inputs hold.
    assert {len(key.split(":")) for key in keys} == {7}


def test_embedding_key_rejects_empty_parts() -> None:
    with pytest.raises(ValueError):
        embedding_key("", "image", b"")
    with pytest.raises(ValueError):
        embedding_key(MODEL, "", b"")


def test_label_set_key_is_unambiguous() -> None:
    keys = [
        label_set_key(MODEL, ["a,b"], ["t"]),
        label_set_key(MODEL, ["a", "b"], ["t"]),
        label_set_key(MODEL, ["b", "a"], ["t"]),
        label_set_key(MODEL, ["a"], ["b", "t"]),
        label_set_key(MODEL, ["a", "b", "t"], []),
        label_set_key(MODEL, ["a\0b"], ["t"]),
        label_set_key(MODEL, ['a","b'], ["t"]),
        label_set_key(MODEL, ["a", "b"], ["t"], preprocess="bpe:77"),
        label_set_key("other@1", ["a", "b"], ["t"]),
    ]
    assert len(set(keys)) == len(keys)
    assert label_set_key(MODEL, ("a", "b"), ("t",)) == keys[1]
    # A label set never shares a key with an embedding, whatever the payload.
    assert not any(key.startswith("clip:v3:emb:") for key in keys)


# ---------------------------------------------------------------------- local LRU
async def test_lru_evicts_least_recently_used() -> None:
    metrics = Metrics()
    cache = EmbeddingCache(metrics=metrics, local_items=3)
    await cache.put_many([("a", vec(1)), ("b", vec(2)), ("c", vec(3))])
    await cache.get_many(["a"])  # a becomes the most recent; b is now the oldest
    await cache.put_many([("d", vec(4))])
    got = await cache.get_many(["a", "b", "c", "d"])
    assert got[1] is None
    for value, seed in zip([got[0], got[2], got[3]], [1, 3, 4], strict=True):
        assert value is not None
        assert np.array_equal(value.vector, vec(seed))
    assert len(cache) == 3
    assert sample(metrics.registry, "clip_cache_hits_total", level="local") == 4
    assert sample(metrics.registry, "clip_cache_misses_total", level="local") == 1
    assert cache.describe() == "local LRU 3"


async def test_lru_values_are_private_float32_copies() -> None:
    cache = EmbeddingCache(metrics=Metrics(), local_items=10)
    original = np.arange(4, dtype=np.float64)
    await cache.put_many([("k", original)])
    original[0] = 99.0  # the caller's array changing later must not change the cache
    (got,) = await cache.get_many(["k"])
    assert got is not None
    assert got.vector.dtype == np.float32
    assert np.array_equal(got.vector, np.arange(4, dtype=np.float32))
    with pytest.raises(ValueError):
        got.vector[0] = 1.0  # shared with later readers, so read-only


async def test_lru_disabled_and_no_redis_is_a_null_cache() -> None:
    metrics = Metrics()
    cache = EmbeddingCache(metrics=metrics, local_items=0)
    await cache.put_many([("k", vec(1))])
    assert await cache.get_many(["k", "k"]) == [None, None]
    assert sample(metrics.registry, "clip_cache_misses_total", level="local") == 0
    assert await cache.get_many([]) == []


# ---------------------------------------------------------------------- redis level, faked
async def test_one_mget_for_all_lru_misses_and_promotion() -> None:
    metrics = Metrics()
    fake = FakeRedis()
    cache = fake_cache(fake, metrics, local_items=10)
    fake.data["r1"] = encode_value(vec(1))
    fake.data["r2"] = encode_value(vec(2))
    await cache.put_many([("l1", vec(3))])
    assert fake.pipelines == 1
    got = await cache.get_many(["l1", "r1", "nope", "r2", "r1"])
    assert fake.mget_calls == 1
    assert got[2] is None
    for value, seed in zip([got[0], got[1], got[3], got[4]], [3, 1, 2, 1], strict=True):
        assert value is not None and np.array_equal(value.vector, vec(seed))
    assert sample(metrics.registry, "clip_cache_hits_total", level="local") == 1
    assert sample(metrics.registry, "clip_cache_misses_total", level="local") == 4
    assert sample(metrics.registry, "clip_cache_hits_total", level="redis") == 3
    assert sample(metrics.registry, "clip_cache_misses_total", level="redis") == 1
    # Promoted: the next lookup is served by the LRU without calling Redis.
    await cache.get_many(["r1", "r2"])
    assert fake.mget_calls == 1


async def test_invalid_values_are_counted_misses() -> None:
    metrics = Metrics()
    fake = FakeRedis()
    cache = fake_cache(fake, metrics)
    fake.data.update(
        {
            "odd": b"\x00" * 8,  # a flags byte and 7 bytes: not whole floats
            "empty": b"",
            "no-flags": vec(1).astype("<f4").tobytes(),  # the v1 layout: 32 bytes, no flags
            "bad-flags": b"\x80" + vec(1).astype("<f4").tobytes(),
            "not-unit": encode_value(vec(1) * 3),
            "nan": encode_value(np.full(8, np.nan, dtype=np.float32)),
            "good": encode_value(vec(1), truncated=True),
        }
    )
    keys = ["odd", "empty", "no-flags", "bad-flags", "not-unit", "nan", "good"]
    got = await cache.get_many(keys, size=8)
    assert [g is not None for g in got] == [False] * 6 + [True]
    assert got[-1] is not None and got[-1].truncated
    assert sample(metrics.registry, "clip_cache_corrupt_total") == 6
    assert sample(metrics.registry, "clip_cache_errors_total", level="redis") == 0
    assert sample(metrics.registry, "clip_cache_misses_total", level="redis") == 6
    assert sample(metrics.registry, "clip_cache_hits_total", level="redis") == 1
    # With an expected size, a well-formed value of another length is invalid too.
    cache = fake_cache(fake, metrics)
    assert await cache.get_many(["good"], size=16) == [None]
    assert sample(metrics.registry, "clip_cache_corrupt_total") == 7
    assert not cache.breaker_open  # bad data is not a Redis outage


async def test_breaker_opens_half_opens_and_closes() -> None:
    metrics = Metrics()
    fake = FakeRedis()
    clock = FakeClock()
    cache = fake_cache(fake, metrics, clock, breaker_failures=3, breaker_reset_s=5.0)
    fake.failing = True
    for _ in range(3):
        assert await cache.get_many(["k"]) == [None]
    assert fake.calls == 3
    assert sample(metrics.registry, "clip_cache_errors_total", level="redis") == 3
    assert sample(metrics.registry, "clip_cache_breaker_open") == 1
    assert cache.breaker_open

    # Open: Redis is not called at all, for gets or puts.
    await cache.get_many(["k"])
    await cache.put_many([("k", vec(1))])
    clock.advance(4.9)
    await cache.get_many(["k"])
    assert fake.calls == 3

    # Half-open: one trial; it fails, so the breaker stays open for another period.
    clock.advance(0.1)
    await cache.get_many(["k"])
    assert fake.calls == 4
    await cache.get_many(["k"])
    assert fake.calls == 4
    assert sample(metrics.registry, "clip_cache_breaker_open") == 1

    # Redis is back: the next trial succeeds and closes the breaker.
    fake.failing = False
    fake.data["k"] = encode_value(vec(7))
    clock.advance(5.0)
    (got,) = await cache.get_many(["k"])
    assert got is not None and np.array_equal(got.vector, vec(7))
    assert sample(metrics.registry, "clip_cache_breaker_open") == 0
    assert not cache.breaker_open
    # Closed again: failures must reach the threshold anew before it reopens.
    fake.failing = True
    for _ in range(2):
        await cache.get_many(["k"])
    assert sample(metrics.registry, "clip_cache_breaker_open") == 0


async def test_success_resets_the_consecutive_error_count() -> None:
    metrics = Metrics()
    fake = FakeRedis()
    cache = fake_cache(fake, metrics, FakeClock(), breaker_failures=3)
    for _ in range(3):
        fake.failing = True
        await cache.get_many(["k"])
        await cache.get_many(["k"])
        fake.failing = False
        await cache.get_many(["k"])
    assert sample(metrics.registry, "clip_cache_errors_total", level="redis") == 6
    assert sample(metrics.registry, "clip_cache_breaker_open") == 0


async def _half_open_trial_waiting() -> tuple[
    EmbeddingCache, FakeRedis, asyncio.Task[list[CachedVector | None]]
]:
    """A cache whose breaker opened on one failure, and its half-open trial 5 s later,
    waiting on a Redis that is back but stalls (`fake.stall`)."""
    fake = FakeRedis()
    clock = FakeClock()
    cache = fake_cache(fake, Metrics(), clock, breaker_failures=1, breaker_reset_s=5.0)
    fake.failing = True
    await cache.get_many(["k"])
    assert cache.breaker_open
    fake.failing = False
    clock.advance(5.0)
    fake.stall = asyncio.Event()
    trial = asyncio.create_task(cache.get_many(["k"]))
    await until(lambda: fake.mget_calls == 2)  # the trial is waiting on Redis
    return cache, fake, trial


async def test_half_open_lets_exactly_one_trial_through() -> None:
    cache, fake, trial = await _half_open_trial_waiting()
    # While the trial is out, everyone else skips Redis instead of piling on.
    assert await cache.get_many(["k"]) == [None]
    assert fake.mget_calls == 2
    fake.stall.set()
    await trial
    assert not cache.breaker_open


async def test_cancelled_trial_frees_the_half_open_slot() -> None:
    cache, fake, trial = await _half_open_trial_waiting()
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    fake.stall = None
    await cache.get_many(["k"])
    assert fake.mget_calls == 3
    assert not cache.breaker_open


async def test_slow_redis_is_cut_off_by_the_timeout() -> None:
    """Each call is cut at the cache's own timeout, whatever the machine's speed: two
    calls of a cache with 0.02 s end while one call of a cache with 5 s still waits."""
    metrics = Metrics()
    fake = FakeRedis()
    fake.stall = asyncio.Event()  # never set: Redis hangs
    cache = fake_cache(fake, metrics, timeout_s=0.02, local_items=4)
    patient_fake = FakeRedis()
    patient_fake.stall = asyncio.Event()
    patient = fake_cache(patient_fake, Metrics(), timeout_s=5.0)
    waiting = asyncio.create_task(patient.get_many(["k"]))
    await until(lambda: patient_fake.mget_calls == 1)  # its 5 s have begun
    await cache.put_many([("k", vec(1))])
    got = await cache.get_many(["k", "other"])
    # Timers fire in order: only a loop stalled for ~5 s could let the 5 s one end first.
    assert not waiting.done()
    assert got[0] is not None and got[1] is None  # the LRU still serves
    assert sample(metrics.registry, "clip_cache_errors_total", level="redis") == 2
    assert (fake.mget_calls, fake.pipelines) == (1, 1)  # both reached Redis, neither ended
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


def test_wiring_takes_the_redis_settings_and_describe_hides_the_password() -> None:
    settings = Settings(
        redis_url="redis://:s3cret@cache.internal:6380/2?password=s3cret",
        local_cache_items=123,
        redis_timeout_s=0.05,
        redis_breaker_failures=4,
    )
    cache = build_cache(settings, Metrics())
    text = cache.describe()
    assert "s3cret" not in text
    assert text.startswith("local LRU 123 + redis://cache.internal:6380/2")
    assert "breaker 4 errors" in text
