"""The in-process cache: bounded in bytes, flags kept, label sets in an LRU of their own."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.cache import EmbeddingCache
from service.metrics import Metrics


def _unit(dim: int, seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


async def test_the_lru_is_bounded_in_bytes_as_well_as_entries() -> None:
    # Room for 100 entries but only 10 vectors of 1024 floats (4 KiB each).
    cache = EmbeddingCache(metrics=Metrics(), local_items=100, local_bytes=10 * 4096)
    await cache.put_many([(f"k{i}", _unit(1024, i)) for i in range(25)])
    assert len(cache) == 10 and cache.local_bytes == 10 * 4096
    found = cache.get_local([f"k{i}" for i in range(25)])
    assert [e is not None for e in found] == [False] * 15 + [True] * 10  # oldest went first
    # A vector bigger than the whole budget is not kept (it would evict everything).
    await cache.put_many([("huge", _unit(20_000, 1))])
    assert cache.get_local(["huge"]) == [None] and len(cache) == 10


async def test_truncated_is_kept_with_the_vector_in_the_lru() -> None:
    cache = EmbeddingCache(metrics=Metrics(), local_items=10)
    await cache.put_many([("cut", _unit(8, 1)), ("whole", _unit(8, 2))], truncated=[True, False])
    cut, whole = cache.get_local(["cut", "whole"])
    assert cut is not None and cut.truncated
    assert whole is not None and not whole.truncated


async def test_a_label_cache_of_its_own_never_evicts_vectors() -> None:
    vectors = EmbeddingCache(metrics=Metrics(), local_items=4)
    labels = vectors.with_own_lru(2)
    await vectors.put_many([(f"v{i}", _unit(8, i)) for i in range(4)])
    await labels.put_many([(f"label{i}", _unit(8, 100 + i)) for i in range(50)])
    assert all(e is not None for e in vectors.get_local([f"v{i}" for i in range(4)]))
    assert len(labels) == 2 and len(vectors) == 4
    with pytest.raises(ValueError):
        vectors.with_own_lru(-1)
