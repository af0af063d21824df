"""Embedder logic with a counting fake backend and metadata in memory: no servers, no model."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.core import validation
from service.core.admission import Admission
from service.core.cache import EmbeddingCache
from service.core.embedder import Embedder, EmbedderOptions
from service.errors import InvalidInput, Overloaded
from service.metrics import Metrics
from service.settings import Settings
from service.wiring import build_limits
from tests.support.fakes import model_metadata
from tests.support.images import encode, photo_like


class CountingBackend:
    """Returns a deterministic vector per row and remembers every call."""

    name = "fake"
    max_batch_size = 4

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.delay_s = delay_s

    async def start(self) -> None: ...

    async def ready(self) -> bool:
        return True

    async def _answer(self, kind: str, rows: np.ndarray) -> np.ndarray:
        self.calls.append((kind, rows.shape))
        await asyncio.sleep(self.delay_s)
        seeds = rows.reshape(len(rows), -1).sum(axis=1, dtype=np.int64)
        vectors = np.stack([np.random.default_rng(int(s)).normal(size=64) for s in seeds])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    async def embed_images(self, pixels_uint8: np.ndarray, *, timeout_s=None) -> np.ndarray:
        return await self._answer("image", pixels_uint8)

    async def embed_texts(self, token_ids: np.ndarray, *, timeout_s=None) -> np.ndarray:
        return await self._answer("text", token_ids)

    async def aclose(self) -> None: ...


def _embedder(backend: CountingBackend, *, admit: int = 2048, **limits: int) -> Embedder:
    metrics = Metrics()
    return Embedder(
        backend=backend,
        cache=EmbeddingCache(metrics=metrics, local_items=100),
        label_cache=EmbeddingCache(metrics=metrics, local_items=100),
        metadata=model_metadata(),
        limits=build_limits(Settings().replace(**limits)),
        metrics=metrics,
        admission=Admission(admit, metrics),
        options=EmbedderOptions(
            decode_threads=2,
            exif_transpose=True,
            decode_budget_pixels=None,
            text_length_buckets=(8, 16, 24, 32, 48, 77),
        ),
    )


async def test_texts_are_padded_to_buckets() -> None:
    backend = CountingBackend()
    embedder = _embedder(backend)
    texts = ["a", "b c", "word " * 12, "word " * 30] + [f"t{i}" for i in range(5)]
    out = await embedder.embed_texts(texts)
    assert len(out) == len(texts)
    shapes = sorted(shape for _, shape in backend.calls)
    # 7 short texts → bucket 8 in one call (the batching queue cuts it to the backend's
    # limit); a 14-token text → 16; a 32-token one → 32.
    assert shapes == [(1, 16), (1, 32), (7, 8)]


async def test_a_failed_owner_does_not_fail_a_waiter_on_a_good_item() -> None:
    backend = CountingBackend()
    embedder = _embedder(backend)
    good = encode(photo_like(300, 200, seed=1), "PNG")
    owner = asyncio.create_task(embedder.embed_images([good, b"broken"]))
    await asyncio.sleep(0)  # the owner claims `good` and starts decoding
    waiter = asyncio.create_task(embedder.embed_images([good]))
    with pytest.raises(InvalidInput) as err:
        await owner
    assert err.value.index == 1
    result = await waiter
    assert result[0].vector.shape == (64,)
    assert embedder.admitted == 0 and not len(embedder._flights)


async def test_waiter_on_a_bad_item_gets_its_own_index() -> None:
    embedder = _embedder(CountingBackend())
    bad = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    first = asyncio.create_task(embedder.embed_images([bad]))
    await asyncio.sleep(0)
    second = asyncio.create_task(embedder.embed_images([encode(photo_like(10, 10), "PNG"), bad]))
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(r, InvalidInput) for r in results)
    assert [r.index for r in results] == [0, 1]


async def test_admission_refuses_past_the_bound_and_releases() -> None:
    backend = CountingBackend(delay_s=0.2)
    embedder = _embedder(backend, admit=6)
    first = asyncio.create_task(embedder.embed_texts([f"x{i}" for i in range(4)]))
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded):
        await embedder.embed_texts([f"y{i}" for i in range(4)])
    await first
    assert embedder.admitted == 0
    assert len(await embedder.embed_texts([f"y{i}" for i in range(4)])) == 4


async def test_texts_are_tokenized_on_the_decode_threads_never_on_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 10,000-letter word costs the BPE real time: on the event loop, every call and health
    check would wait behind it. Texts for embeddings and prompts for label sets are both
    tokenized on the decode pool's threads."""
    embedder = _embedder(CountingBackend())
    loop_thread = threading.current_thread()
    threads: list[threading.Thread] = []
    tokenize = embedder.tokenizer.tokenize

    def recording_tokenize(text: str, language: str | None = None) -> object:
        threads.append(threading.current_thread())
        return tokenize(text, language)

    monkeypatch.setattr(embedder.tokenizer, "tokenize", recording_tokenize)
    await embedder.embed_texts(["a red circle", "x" * 10_000])
    texts_seen = len(threads)
    await embedder.label_embeddings(["circle", "star"], ["a photo of a {}.", "a {}"])
    assert texts_seen == 2 and len(threads) == 2 + 4, threads
    assert all(t is not loop_thread for t in threads), [t.name for t in threads]
    assert all(t.name.startswith("decode") for t in threads), [t.name for t in threads]
    await embedder.aclose()


async def test_a_lone_surrogate_is_invalid_input_on_every_text_path() -> None:
    """Issue 24, case 5: a str with no UTF-8 form raised UnicodeEncodeError (INTERNAL)
    while its cache key was hashed; it is bad input, named by its index."""
    backend = CountingBackend()
    embedder = _embedder(backend)
    with pytest.raises(InvalidInput) as err:
        await embedder.embed_texts(["fine", "a \ud800 b"], field="input")
    assert str(err.value).startswith("input[1]: text holds \\ud800 at character 2")
    with pytest.raises(InvalidInput, match=r"labels\[0\]: text holds"):
        validation.check_labels(["\udfff"], ["{}"], embedder.limits)
    with pytest.raises(InvalidInput, match=r"templates\[0\]: text holds"):
        validation.check_labels(["cat"], ["\ud800 {}"], embedder.limits)
    assert backend.calls == []


async def test_token_counts_come_with_the_vectors_and_stay_with_the_cached_ones() -> None:
    embedder = _embedder(CountingBackend())
    texts = ["a red circle", "star " * 100]
    fresh = await embedder.embed_texts(texts)
    cached = await embedder.embed_texts(texts)
    assert [r.tokens for r in fresh] == [5, 77] and not any(r.cached for r in fresh)
    assert [r.tokens for r in cached] == [5, 77] and all(r.cached for r in cached)
    assert await embedder.count_tokens(texts) == [5, 77]  # the same count, off the loop
    images = await embedder.embed_images([encode(photo_like(40, 30), "PNG")])
    assert images[0].tokens is None
