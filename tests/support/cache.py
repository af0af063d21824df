"""Test caches: shorthand keywords → `EmbeddingCache` keywords; waiting for a cached answer."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from service.core.cache import RedisOptions

if TYPE_CHECKING:
    from service.client import Embeddings


def cache_options(
    redis_defaults: dict[str, Any], kwargs: dict[str, Any], clock: Callable[[], float] | None
) -> dict[str, Any]:
    """Test shorthand → EmbeddingCache keywords: Redis fields go into `RedisOptions`."""
    redis_fields = {f.name for f in dataclasses.fields(RedisOptions)}
    redis = {"ttl_s": 600, "breaker_failures": 3, "breaker_reset_s": 5.0, **redis_defaults}
    redis.update({k: v for k, v in kwargs.items() if k in redis_fields})
    options: dict[str, Any] = {"local_items": 0, "redis": RedisOptions(**redis)}
    options.update({k: v for k, v in kwargs.items() if k not in redis_fields})
    if clock is not None:
        options["clock"] = clock
    return options


async def until_cached(
    call: Callable[[], Awaitable[Embeddings]], timeout_s: float = 120.0
) -> Embeddings:
    """Repeat `call` until its answer says cached for every item; returns that answer.

    A gateway's first caller gets its vector before the Redis write returns (the key stays
    claimed until the write is done); a repeat that comes meanwhile shares that first
    computation (not cached, and no backend work either). So one immediate repeat may be
    answered `cached=False` on any machine; polling until a cached answer cannot race.
    Once it returns, Redis holds every item's value and no computation of them is pending.
    `timeout_s` only ends a broken test: the write takes milliseconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not all((answer := await call()).cached):
        assert loop.time() < deadline, f"never answered from the cache within {timeout_s} s"
        await asyncio.sleep(0.05)  # poll interval, not a wait for the work
    return answer
