"""The embedding cache: an in-process LRU in front of an optional shared Redis.

Lookups go LRU first, then one `MGET` for everything the LRU missed; fills go to
the LRU and one pipelined batch of `SET key value EX ttl`. A value is one flags byte
(bit 0: the text was truncated) followed by the vector as float32 little-endian, so any
gateway (any CPU) reads what another wrote. A value read back is checked (length for
the caller's dimension, finite, unit length); anything else is a miss, counted in
`clip_cache_corrupt_total`, and is overwritten when the vector is computed again.
The LRU is bounded in entries and in bytes.

Redis is an optimisation, never a dependency: every call is bounded by a timeout,
every failure is counted and swallowed (the caller sees a miss), and a circuit
breaker stops calling Redis for a while after a run of consecutive failures, so an
outage costs each request nothing instead of one timeout.
"""

from __future__ import annotations

import asyncio
import copy
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
_FLAG_TRUNCATED = 0x01
# An L2-normalised float32 vector's norm is 1 within rounding; far off = not ours.
_NORM_TOLERANCE = 1e-3


def encode_value(vector: np.ndarray, *, truncated: bool = False) -> bytes:
    """A vector as a shared-cache value: one flags byte, then float32 little-endian."""
    flags = bytes([_FLAG_TRUNCATED if truncated else 0])
    return flags + np.asarray(vector, dtype=_WIRE_DTYPE).reshape(-1).tobytes()


@dataclass(frozen=True)
class CachedVector:
    """A cached embedding: the vector (float32, 1-D, read-only) and how it was made."""

    vector: np.ndarray
    truncated: bool = False
    #: Token ids the model read of the text, kept in the LRU only (for OpenAI's `usage`
    #: without tokenizing again); None from Redis, whose values keep no count.
    tokens: int | None = None

    @property
    def nbytes(self) -> int:
        """Memory the vector holds."""
        return int(self.vector.nbytes)


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
        local_bytes: int | None = None,
        redis: RedisOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        client: aioredis.Redis | None = None,
    ) -> None:
        """Build the cache; no I/O happens here (Redis connects on first use).

        `local_bytes` bounds the LRU's vectors in bytes too (None: entries only);
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
        if local_bytes is not None and local_bytes < 0:
            raise ValueError(f"local_bytes must be >= 0, got {local_bytes}")
        self._local_items = local_items
        self._local_bytes_limit = local_bytes
        self._local_bytes = 0
        self._local: OrderedDict[str, CachedVector] = OrderedDict()
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
        self._corrupt = metrics.cache_corrupt
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

    def with_own_lru(self, local_items: int) -> EmbeddingCache:
        """A cache with an LRU of its own (`local_items` entries, the same byte cap) that
        shares this one's Redis client, breaker and metrics: one Redis, one breaker."""
        if local_items < 0:
            raise ValueError(f"local_items must be >= 0, got {local_items}")
        other = copy.copy(self)
        other._local_items = local_items
        other._local = OrderedDict()
        other._local_bytes = 0
        return other

    # ------------------------------------------------------------------ public API
    async def get_many(
        self, keys: Sequence[str], *, size: int | None = None
    ) -> list[CachedVector | None]:
        """The cached entry for each key (None where missing), in the order given:
        `get_local`, then `get_shared` for what the LRU missed."""
        results = self.get_local(keys)
        missing = [key for key, entry in zip(keys, results, strict=True) if entry is None]
        if missing:
            shared = dict(zip(missing, await self.get_shared(missing, size=size), strict=True))
            results = [
                shared.get(key) if e is None else e for key, e in zip(keys, results, strict=True)
            ]
        return results

    def get_local(self, keys: Sequence[str]) -> list[CachedVector | None]:
        """The LRU's entry for each key (None where missing); never suspends."""
        results = [self._local_get(key) for key in keys]
        if self._local_items:
            n_missing = sum(entry is None for entry in results)
            self._local_hits.inc(len(keys) - n_missing)
            self._local_misses.inc(n_missing)
        return results

    async def get_shared(
        self, keys: Sequence[str], *, size: int | None = None
    ) -> list[CachedVector | None]:
        """Redis's entry for each key (None where missing, invalid or Redis is down).

        `size`, when given, is the expected number of floats per value; a value of any
        other length, or not a finite unit vector, is a miss. Hits fill the LRU.
        """
        results: list[CachedVector | None] = [None] * len(keys)
        if not keys or self._client is None:
            return results
        client = self._client
        unique_keys = list(dict.fromkeys(keys))
        raw_values = await self._call_redis("MGET", lambda: client.mget(unique_keys))
        if raw_values is None:
            return results
        found: dict[str, CachedVector] = {}
        for key, raw in zip(unique_keys, raw_values, strict=True):
            entry = self._decode(key, raw, size) if raw is not None else None
            if entry is not None:
                self._local_put(key, entry)
                found[key] = entry
        results = [found.get(key) for key in keys]
        hits = sum(entry is not None for entry in results)
        self._redis_hits.inc(hits)
        self._redis_misses.inc(len(keys) - hits)
        return results

    async def put_many(
        self,
        entries: Sequence[tuple[str, np.ndarray]],
        *,
        truncated: Sequence[bool] = (),
        tokens: Sequence[int | None] = (),
    ) -> None:
        """Store vectors (flattened to float32) in the LRU and, in one pipeline, Redis;
        `truncated[i]` (default False) is kept with the i-th vector, `tokens[i]` (default
        None) with its LRU entry only."""
        packed: dict[str, bytes] = {}
        for index, (key, vector) in enumerate(entries):
            stored = np.array(vector, dtype=np.float32, copy=True).reshape(-1)
            # Read-only because the same array is handed to every later reader.
            stored.flags.writeable = False
            cut = bool(truncated[index]) if index < len(truncated) else False
            count = tokens[index] if index < len(tokens) else None
            self._local_put(key, CachedVector(stored, cut, count))
            packed[key] = encode_value(stored, truncated=cut)
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
    def _local_get(self, key: str) -> CachedVector | None:
        entry = self._local.get(key)
        if entry is not None:
            self._local.move_to_end(key)
        return entry

    def _local_put(self, key: str, entry: CachedVector) -> None:
        if not self._local_items:
            return
        if self._local_bytes_limit is not None and entry.nbytes > self._local_bytes_limit:
            return  # larger than the whole LRU: keeping it would evict everything
        old = self._local.pop(key, None)
        if old is not None:
            self._local_bytes -= old.nbytes
        self._local[key] = entry
        self._local_bytes += entry.nbytes
        while len(self._local) > self._local_items or (
            self._local_bytes_limit is not None and self._local_bytes > self._local_bytes_limit
        ):
            _, evicted = self._local.popitem(last=False)
            self._local_bytes -= evicted.nbytes

    @property
    def local_bytes(self) -> int:
        """Bytes of vectors the LRU holds now."""
        return self._local_bytes

    def _decode(self, key: str, raw: bytes, size: int | None) -> CachedVector | None:
        body = len(raw) - 1
        expected = None if size is None else size * _WIRE_DTYPE.itemsize
        problem = None
        if body <= 0 or body % _WIRE_DTYPE.itemsize or (expected not in (None, body)):
            problem = f"{len(raw)} bytes, expected 1 + {expected or 'a multiple of 4'}"
        elif raw[0] & ~_FLAG_TRUNCATED:
            problem = f"unknown flags {raw[0]:#04x}"
        else:
            # astype copies into a fresh native-endian array that owns its memory.
            vector = np.frombuffer(raw, dtype=_WIRE_DTYPE, offset=1).astype(np.float32)
            norm = float(np.linalg.norm(vector))
            if not np.isfinite(norm) or abs(norm - 1.0) > _NORM_TOLERANCE:
                problem = f"not a unit vector (norm {norm:.4g})"
        if problem is not None:
            self._corrupt.inc()
            _LOGGER.warning("invalid cache value for %s: %s; treated as a miss", key, problem)
            return None
        vector.flags.writeable = False
        return CachedVector(vector, truncated=bool(raw[0] & _FLAG_TRUNCATED))

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
