"""The embedding cache: an in-process LRU in front of an optional shared Redis.

Lookups go LRU first, then one `MGET` for everything the LRU missed; fills go to
the LRU and one pipelined batch of `SET key value EX ttl`. Values are float32
little-endian bytes, so any gateway (any CPU) reads what another wrote.

Redis is an optimisation, never a dependency: every call is bounded by a timeout,
every failure is counted and swallowed (the caller sees a miss), and a circuit
breaker stops calling Redis for a while after a run of consecutive failures, so an
outage costs each request nothing instead of one timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.metrics import Metrics

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")
_WIRE_DTYPE = np.dtype("<f4")


class CircuitBreaker:
    """Counts consecutive failures; while open, says "don't call" until a trial is due.

    closed → (N consecutive failures) → open → (reset_s passed) → half-open: exactly
    one trial call is let through; its success closes the breaker, its failure
    opens it for another reset_s.
    """

    def __init__(
        self,
        *,
        failures: int,
        reset_s: float,
        clock: Callable[[], float],
        on_change: Callable[[bool], None],
    ) -> None:
        if failures < 1:
            raise ValueError(f"breaker failures must be >= 1, got {failures}")
        if reset_s < 0:
            raise ValueError(f"breaker reset_s must be >= 0, got {reset_s}")
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._on_change = on_change
        self._consecutive_failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def is_open(self) -> bool:
        """True while open or half-open (Redis is not trusted yet)."""
        return self._opened_at is not None

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open state, claims the one trial."""
        if self._opened_at is None:
            return True
        if self._clock() - self._opened_at < self._reset_s or self._trial_in_flight:
            return False
        self._trial_in_flight = True
        return True

    def record_success(self) -> None:
        """A call answered: forget past failures and close."""
        self._consecutive_failures = 0
        self._trial_in_flight = False
        if self._opened_at is not None:
            self._opened_at = None
            self._on_change(False)

    def record_failure(self) -> None:
        """A call failed: open after the threshold, or re-open after a failed trial."""
        self._consecutive_failures += 1
        self._trial_in_flight = False
        if self._opened_at is not None:
            self._opened_at = self._clock()
        elif self._consecutive_failures >= self._threshold:
            self._opened_at = self._clock()
            self._on_change(True)

    def abandon(self) -> None:
        """A call was cancelled by its caller: neither success nor failure."""
        # Without this a cancelled trial would leave the breaker half-open forever.
        self._trial_in_flight = False


@dataclass(frozen=True)
class RedisOptions:
    """How the shared level is reached and trusted (no defaults: `Settings` holds them)."""

    #: `redis://…`; '' with no `client` = no shared level.
    url: str
    ttl_s: int
    timeout_s: float
    breaker_failures: int
    breaker_reset_s: float


class EmbeddingCache:
    """Two-level embedding cache (LRU, then Redis); never raises because of Redis."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        local_items: int,
        redis: RedisOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        client: aioredis.Redis | None = None,
    ) -> None:
        """Build the cache; no I/O happens here (Redis connects on first use).

        `redis` None = the LRU alone; `client` replaces the client made from
        `redis.url` (tests pass fakes; `redis` still gives timeouts and the breaker).
        """
        if local_items < 0:
            raise ValueError(f"local_items must be >= 0, got {local_items}")
        if redis is None:
            if client is not None:
                raise ValueError("a redis client needs RedisOptions (timeouts, breaker)")
            redis = RedisOptions(
                url="", ttl_s=1, timeout_s=1.0, breaker_failures=1, breaker_reset_s=0.0
            )  # unused: there is no shared level
        if redis.ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1, got {redis.ttl_s}")
        if redis.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {redis.timeout_s}")
        self._local_items = local_items
        self._local: OrderedDict[str, np.ndarray] = OrderedDict()
        self._redis_url = redis.url
        self._ttl_s = redis.ttl_s
        self._timeout_s = redis.timeout_s
        self._breaker_failures = redis.breaker_failures
        self._breaker_reset_s = redis.breaker_reset_s

        self._local_hits = metrics.cache_hits.labels(level="local")
        self._local_misses = metrics.cache_misses.labels(level="local")
        self._redis_hits = metrics.cache_hits.labels(level="redis")
        self._redis_misses = metrics.cache_misses.labels(level="redis")
        self._redis_errors = metrics.cache_errors.labels(level="redis")
        self._breaker_gauge = metrics.cache_breaker_open
        self._breaker_gauge.set(0)
        self._breaker = CircuitBreaker(
            failures=redis.breaker_failures,
            reset_s=redis.breaker_reset_s,
            clock=clock,
            on_change=self._breaker_changed,
        )

        self._client: aioredis.Redis | None = client
        if self._client is None and redis.url:
            self._client = aioredis.Redis.from_url(
                redis.url,
                decode_responses=False,
                socket_timeout=redis.timeout_s,
                socket_connect_timeout=redis.timeout_s,
                # One immediate retry: after a Redis restart a pooled socket can be
                # dead; redis-py drops it and the retry reconnects, so the first call
                # after a restart succeeds. More retries would only burn the timeout.
                retry=Retry(NoBackoff(), 1),
            )

    # ------------------------------------------------------------------ public API
    async def get_many(
        self, keys: Sequence[str], *, size: int | None = None
    ) -> list[np.ndarray | None]:
        """The cached vector for each key (None where missing), in the order given:
        `get_local`, then `get_shared` for what the LRU missed."""
        results = self.get_local(keys)
        missing = [key for key, vector in zip(keys, results, strict=True) if vector is None]
        if missing:
            shared = dict(zip(missing, await self.get_shared(missing, size=size), strict=True))
            results = [
                shared.get(key) if v is None else v for key, v in zip(keys, results, strict=True)
            ]
        return results

    def get_local(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        """The LRU's vector for each key (None where missing); never suspends.

        Returned arrays are float32, 1-D and read-only (they are shared with the LRU).
        """
        results = [self._local_get(key) for key in keys]
        if self._local_items:
            n_missing = sum(vector is None for vector in results)
            self._local_hits.inc(len(keys) - n_missing)
            self._local_misses.inc(n_missing)
        return results

    async def get_shared(
        self, keys: Sequence[str], *, size: int | None = None
    ) -> list[np.ndarray | None]:
        """Redis's vector for each key (None where missing, corrupt or Redis is down).

        `size`, when given, is the expected number of floats per value; a value of any
        other length is treated as corrupt (a miss and an error). Hits fill the LRU.
        """
        results: list[np.ndarray | None] = [None] * len(keys)
        if not keys or self._client is None:
            return results
        client = self._client
        unique_keys = list(dict.fromkeys(keys))
        raw_values = await self._call_redis("MGET", lambda: client.mget(unique_keys))
        if raw_values is None:
            return results
        found: dict[str, np.ndarray] = {}
        for key, raw in zip(unique_keys, raw_values, strict=True):
            vector = self._decode(key, raw, size) if raw is not None else None
            if vector is not None:
                self._local_put(key, vector)
                found[key] = vector
        results = [found.get(key) for key in keys]
        hits = sum(vector is not None for vector in results)
        self._redis_hits.inc(hits)
        self._redis_misses.inc(len(keys) - hits)
        return results

    async def put_many(self, entries: Sequence[tuple[str, np.ndarray]]) -> None:
        """Store vectors (flattened to float32) in the LRU and, in one pipeline, Redis."""
        packed: dict[str, bytes] = {}
        for key, vector in entries:
            stored = np.array(vector, dtype=np.float32, copy=True).reshape(-1)
            # Read-only because the same array is handed to every later reader.
            stored.flags.writeable = False
            self._local_put(key, stored)
            packed[key] = stored.astype(_WIRE_DTYPE, copy=False).tobytes()
        if not packed or self._client is None:
            return
        client = self._client
        ttl_s = self._ttl_s

        async def set_all() -> list[object]:
            async with client.pipeline(transaction=False) as pipe:
                for key, value in packed.items():
                    pipe.set(key, value, ex=ttl_s)
                return await pipe.execute()

        await self._call_redis("SET pipeline", set_all)

    async def aclose(self) -> None:
        """Close the Redis connections; the LRU keeps working."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await client.aclose()
        except Exception as exc:  # closing a broken connection must not fail shutdown
            _LOGGER.debug("closing the redis client failed: %r", exc)

    def describe(self) -> str:
        """One line for the start-up log; never shows a password."""
        local = f"local LRU {self._local_items}" if self._local_items else "no local LRU"
        if self._client is None and not self._redis_url:
            return local
        where = _public_url(self._redis_url) if self._redis_url else "redis (given client)"
        return (
            f"{local} + {where} (ttl {self._ttl_s} s, timeout {self._timeout_s * 1000:g} ms, "
            f"breaker {self._breaker_failures} errors / {self._breaker_reset_s:g} s)"
        )

    @property
    def breaker_open(self) -> bool:
        """True while Redis is being skipped (or awaiting a successful trial)."""
        return self._breaker.is_open

    def __len__(self) -> int:
        """Entries in the local LRU."""
        return len(self._local)

    # ------------------------------------------------------------------ internals
    def _local_get(self, key: str) -> np.ndarray | None:
        vector = self._local.get(key)
        if vector is not None:
            self._local.move_to_end(key)
        return vector

    def _local_put(self, key: str, vector: np.ndarray) -> None:
        if not self._local_items:
            return
        self._local[key] = vector
        self._local.move_to_end(key)
        while len(self._local) > self._local_items:
            self._local.popitem(last=False)

    def _decode(self, key: str, raw: bytes, size: int | None) -> np.ndarray | None:
        n_bytes = len(raw)
        expected = None if size is None else size * _WIRE_DTYPE.itemsize
        if n_bytes == 0 or n_bytes % _WIRE_DTYPE.itemsize or (expected not in (None, n_bytes)):
            self._redis_errors.inc()
            _LOGGER.warning(
                "corrupt cache value for %s: %d bytes (expected %s); treated as a miss",
                key,
                n_bytes,
                expected if expected is not None else "a multiple of 4",
            )
            return None
        # astype copies into a fresh native-endian array that owns its memory.
        vector = np.frombuffer(raw, dtype=_WIRE_DTYPE).astype(np.float32)
        vector.flags.writeable = False
        return vector

    async def _call_redis(self, what: str, make_call: Callable[[], Awaitable[_T]]) -> _T | None:
        """Run one Redis call under the breaker and timeout; None if skipped or failed."""
        if not self._breaker.allow():
            return None
        try:
            # Socket timeouts alone do not bound connection-pool waits or retries.
            result = await asyncio.wait_for(make_call(), self._timeout_s)
        except asyncio.CancelledError:
            self._breaker.abandon()
            raise
        except Exception as exc:  # any Redis fault becomes a miss, never a failed request
            self._redis_errors.inc()
            self._breaker.record_failure()
            _LOGGER.debug("redis %s failed: %r", what, exc)
            return None
        self._breaker.record_success()
        return result

    def _breaker_changed(self, is_open: bool) -> None:
        self._breaker_gauge.set(1 if is_open else 0)
        if is_open:
            _LOGGER.warning(
                "redis cache breaker open after %d consecutive errors; skipping redis for %g s",
                self._breaker_failures,
                self._breaker_reset_s,
            )
        else:
            _LOGGER.info("redis cache breaker closed; redis is used again")


def _public_url(url: str) -> str:
    """The URL without credentials or query (a query can carry `password=`)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # redis-py would have refused it already; stay safe anyway
        port = ":?"
    return f"{parts.scheme}://{host}{port}{parts.path or '/0'}"
