"""Building test caches: shorthand keywords → `EmbeddingCache` keywords."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from service.core.cache import RedisOptions


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
