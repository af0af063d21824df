"""The embedding pipeline: validate → cache lookup → prepare misses → backend → cache fill.

Handlers only talk to this class. Identical misses, within one request or across
concurrent ones, are computed once: the first caller starts a task that owns the key
and the others await it; the task is shielded, so a caller that cancels does not fail
the others waiting on the same work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.backends.base import Backend
from service.core import validation
from service.core.admission import Admission
from service.core.cache import EmbeddingCache
from service.core.cache_keys import embedding_key, label_set_key
from service.core.image_preprocess import (
    PREPROCESS_VERSION,
    ImageLimits,
    ImageSpec,
    preprocess_image_bytes,
)
from service.core.scoring import (
    Ranked,
    cosine,
    ensemble,
    prompts,
    rank,
    softmax_scores,
)
from service.core.text_tokenize import TextTokenizer, Tokens
from service.core.validation import Limits
from service.errors import BackendFailure, InvalidInput
from service.metrics import Metrics
from service.model.metadata import ModelMetadata

_LOGGER = logging.getLogger(__name__)
# Label sets are embedded in waves of this many prompts so one huge set cannot take the
# whole admission budget at once.
_LABEL_WAVE = 256

Run = Callable[[float | None], Awaitable[list["Embedded"]]]
Prepare = Callable[[list[int]], Awaitable[Run]]


class _Abandoned(Exception):
    """The request that owned a key failed on another item; the waiter computes again."""


@dataclass(frozen=True)
class Embedded:
    """One input's vector and how it was made."""

    vector: np.ndarray
    cached: bool = False
    truncated: bool = False


@dataclass(frozen=True)
class EmbedderOptions:
    """Pipeline knobs that are not caller-facing limits."""

    max_queued_items: int = 2048
    decode_threads: int = 0
    exif_transpose: bool = True
    text_length_buckets: tuple[int, ...] = (8, 16, 24, 32, 48, 77)


class Embedder:
    """Turns texts and image bytes into vectors, with caching, dedup and admission control."""

    def __init__(
        self,
        *,
        backend: Backend,
        cache: EmbeddingCache,
        metadata: ModelMetadata,
        limits: Limits,
        metrics: Metrics,
        options: EmbedderOptions | None = None,
        admission: Admission | None = None,
    ) -> None:
        options = options or EmbedderOptions()
        self.backend = backend
        self.cache = cache
        self.metadata = metadata
        self.limits = limits
        self._metrics = metrics
        self.admission = admission or Admission(options.max_queued_items, metrics)
        self.tokenizer = TextTokenizer(metadata.context_length, options.text_length_buckets)
        self._image_spec = ImageSpec(metadata.image_size, metadata.interpolation)
        self._image_limits = ImageLimits(
            limits.max_image_bytes, limits.max_image_pixels, options.exif_transpose
        )
        exif = "exif" if options.exif_transpose else "raw"
        self._image_fingerprint = (
            f"pp{PREPROCESS_VERSION}/{metadata.image_size}/{metadata.interpolation}/{exif}"
        )
        self._decode_pool = ThreadPoolExecutor(
            max_workers=options.decode_threads or os.cpu_count() or 1, thread_name_prefix="decode"
        )
        self._inflight: dict[str, asyncio.Future[Embedded]] = {}

    @property
    def model_id(self) -> str:
        """Identity of the served weights (responses and cache keys)."""
        return self.metadata.model_id

    # ------------------------------------------------------------------ public API
    async def embed_texts(
        self, texts: Sequence[str], *, timeout_s: float | None = None, field: str = "texts"
    ) -> list[Embedded]:
        """Vectors for `texts`, in order; validates count and lengths first."""
        validation.check_texts(texts, self.limits, field)
        return await self._embed_texts(texts, timeout_s)

    async def embed_images(
        self, images: Sequence[bytes], *, timeout_s: float | None = None, field: str = "images"
    ) -> list[Embedded]:
        """Vectors for encoded `images`, in order; refuses the first bad image by index."""
        validation.check_image_sizes(images, self.limits, field)
        keys = [
            embedding_key(self.model_id, "image", image, self._image_fingerprint)
            for image in images
        ]
        return await self._embed(
            "image", keys, lambda idx: self._prepare_images(images, idx, field), timeout_s, field
        )

    async def label_embeddings(
        self, labels: Sequence[str], templates: Sequence[str], *, timeout_s: float | None = None
    ) -> np.ndarray:
        """`[n_labels, D]`: each label's template ensemble, cached per (label, templates)."""
        fp = self.tokenizer.fingerprint
        keys = [label_set_key(self.model_id, [label], list(templates), fp) for label in labels]
        found = await self.cache.get_many(keys)
        missing = [i for i, vec in enumerate(found) if vec is None]
        if missing:
            texts = [text for i in missing for text in prompts(labels[i], templates)]
            vectors: list[np.ndarray] = []
            for start in range(0, len(texts), _LABEL_WAVE):
                wave = await self._embed_texts(texts[start : start + _LABEL_WAVE], timeout_s)
                vectors.extend(e.vector for e in wave)
            per_label = np.stack(vectors).reshape(len(missing), len(templates), -1)
            fresh = [(keys[i], ensemble(per_label[j])) for j, i in enumerate(missing)]
            for (_, vec), i in zip(fresh, missing, strict=True):
                found[i] = vec
            await self.cache.put_many(fresh)
        return np.stack([vec for vec in found if vec is not None])

    async def classify(
        self,
        images: Sequence[bytes],
        labels: Sequence[str],
        templates: Sequence[str],
        top_k: int,
        *,
        timeout_s: float | None = None,
    ) -> list[list[Ranked]]:
        """Zero-shot: each image's labels ranked by softmax(logit_scale × cosine)."""
        validation.check_labels(labels, templates, self.limits)
        k = validation.check_top_k(top_k, len(labels))
        # Checked here too (embed_images repeats it) so a bad image refuses the call
        # before any label prompt is embedded.
        validation.check_image_sizes(images, self.limits)
        images_task = self.embed_images(images, timeout_s=timeout_s)
        labels_task = self.label_embeddings(labels, templates, timeout_s=timeout_s)
        embedded, label_matrix = await asyncio.gather(images_task, labels_task)
        image_matrix = np.stack([e.vector for e in embedded])
        cos = cosine(image_matrix, label_matrix)
        probs = softmax_scores(cos, self.metadata.logit_scale, self.metadata.logit_bias)
        return [rank(labels, cos[i], probs[i], k) for i in range(len(images))]

    async def warmup(self) -> None:
        """One tiny forward pass per tower, bypassing the cache (proves inference works)."""
        size = self.metadata.image_size
        await self.backend.embed_images(np.zeros((1, 3, size, size), dtype=np.uint8))
        ids = self.tokenizer.pad([self.tokenizer.tokenize("warm up")], 8)
        await self.backend.embed_texts(ids)

    async def aclose(self) -> None:
        """Stop the decode threads (backend and cache are closed by their owner)."""
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ pipeline
    async def _embed_texts(self, texts: Sequence[str], timeout_s: float | None) -> list[Embedded]:
        keys = [
            embedding_key(self.model_id, "text", t.encode("utf-8"), self.tokenizer.fingerprint)
            for t in texts
        ]
        return await self._embed(
            "text", keys, lambda idx: self._prepare_texts(texts, idx), timeout_s, "texts"
        )

    async def _embed(
        self,
        modality: str,
        keys: list[str],
        prepare: Prepare,
        timeout_s: float | None,
        field: str,
    ) -> list[Embedded]:
        self._metrics.items.labels(modality).inc(len(keys))
        for _ in range(3):
            try:
                return await self._embed_once(keys, prepare, timeout_s, field)
            except _Abandoned:
                continue  # another request owned some of our keys and failed on its own input
        raise BackendFailure("could not embed: concurrent requests kept failing on shared inputs")

    async def _embed_once(
        self, keys: list[str], prepare: Prepare, timeout_s: float | None, field: str
    ) -> list[Embedded]:
        unique = list(dict.fromkeys(keys))
        found = dict(zip(unique, await self.cache.get_many(unique), strict=True))
        results: dict[str, Embedded] = {
            k: Embedded(v, cached=True) for k, v in found.items() if v is not None
        }
        waiting: dict[str, asyncio.Future[Embedded]] = {}
        owned = [k for k in unique if k not in results and k not in self._inflight]
        waiting.update({k: self._inflight[k] for k in unique if k in self._inflight})
        if owned:
            self.admission.admit(len(owned))
            loop = asyncio.get_running_loop()
            futures = {k: loop.create_future() for k in owned}
            # Claimed before the first await, so a concurrent identical miss waits for us.
            self._inflight.update(futures)
            try:
                run = await prepare([keys.index(k) for k in owned])
            except BaseException as exc:
                failed = (
                    keys[exc.index]
                    if isinstance(exc, InvalidInput) and exc.index is not None
                    else None
                )
                self._settle(owned, futures, exc, only=failed)
                raise
            task = loop.create_task(self._finish(owned, futures, run, timeout_s))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
            waiting.update(futures)
        if waiting:
            outcomes = await asyncio.gather(
                *(asyncio.shield(f) for f in waiting.values()), return_exceptions=True
            )
            for key, outcome in zip(waiting, outcomes, strict=True):
                if isinstance(outcome, InvalidInput):
                    # Same bytes as the item that failed elsewhere: name our own index.
                    raise InvalidInput(outcome.reason, field=field, index=keys.index(key))
                if isinstance(outcome, BaseException):
                    raise outcome
                results[key] = outcome
        return [results[k] for k in keys]

    def _settle(
        self,
        keys: list[str],
        futures: dict[str, asyncio.Future[Embedded]],
        exc: BaseException,
        only: str | None = None,
    ) -> None:
        """After a failure: release and unclaim; waiters on keys that did not fail retry."""
        self.admission.release(len(keys))
        self._unclaim(keys, futures)
        for key in keys:
            if not futures[key].done():
                futures[key].set_exception(exc if only in (None, key) else _Abandoned())
                futures[key].exception()  # mark retrieved: there may be no waiter

    def _unclaim(self, keys: list[str], futures: dict[str, asyncio.Future[Embedded]]) -> None:
        for key in keys:
            if self._inflight.get(key) is futures[key]:
                del self._inflight[key]

    async def _finish(
        self,
        keys: list[str],
        futures: dict[str, asyncio.Future[Embedded]],
        run: Run,
        timeout_s: float | None,
    ) -> None:
        try:
            embedded = await run(timeout_s)
        except BaseException as exc:
            self._settle(keys, futures, exc)
            raise
        for key, item in zip(keys, embedded, strict=True):
            futures[key].set_result(item)
        self.admission.release(len(keys))  # out of the backend: no longer queued work
        try:
            # Keys stay claimed until the cache holds them, so a late identical miss
            # finds either the claim or the cached vector, never a gap between the two.
            await self.cache.put_many([(k, e.vector) for k, e in zip(keys, embedded, strict=True)])
        finally:
            self._unclaim(keys, futures)

    # ------------------------------------------------------------------ preparation
    async def _prepare_texts(self, texts: Sequence[str], indices: list[int]) -> Run:
        started = time.perf_counter()
        tokens = [self.tokenizer.tokenize(texts[i]) for i in indices]
        self._metrics.preprocess_latency.labels("tokenize").observe(time.perf_counter() - started)

        async def run(timeout_s: float | None) -> list[Embedded]:
            return await self._run_texts(tokens, timeout_s)

        return run

    async def _run_texts(self, tokens: list[Tokens], timeout_s: float | None) -> list[Embedded]:
        # Pad each text only to its bucket edge; same-length rows batch together.
        by_length: dict[int, list[int]] = {}
        for i, t in enumerate(tokens):
            by_length.setdefault(self.tokenizer.bucket_length(len(t.ids)), []).append(i)
        calls = []
        step = self.backend.max_batch_size
        for length, members in by_length.items():
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                ids = self.tokenizer.pad([tokens[i] for i in chunk], length)
                calls.append((chunk, self.backend.embed_texts(ids, timeout_s=timeout_s)))
        outputs = await asyncio.gather(*(c for _, c in calls))
        vectors: list[np.ndarray | None] = [None] * len(tokens)
        for (chunk, _), out in zip(calls, outputs, strict=True):
            for row, i in enumerate(chunk):
                vectors[i] = out[row]
        return [
            Embedded(np.asarray(v, dtype=np.float32), truncated=t.truncated)
            for v, t in zip(vectors, tokens, strict=True)
        ]

    async def _prepare_images(self, images: Sequence[bytes], indices: list[int], field: str) -> Run:
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self._decode_pool, self._decode, images[i]) for i in indices),
            return_exceptions=True,
        )
        for i, result in zip(indices, decoded, strict=True):
            if isinstance(result, InvalidInput):
                raise InvalidInput(result.reason, field=field, index=i)
            if isinstance(result, BaseException):
                raise result
        pixels = np.stack(decoded)  # type: ignore[arg-type]

        async def run(timeout_s: float | None) -> list[Embedded]:
            step = self.backend.max_batch_size
            chunks = [pixels[s : s + step] for s in range(0, len(pixels), step)]
            outs = await asyncio.gather(
                *(self.backend.embed_images(c, timeout_s=timeout_s) for c in chunks)
            )
            return [Embedded(np.asarray(v, dtype=np.float32)) for out in outs for v in out]

        return run

    def _decode(self, image_bytes: bytes) -> np.ndarray:
        started = time.perf_counter()
        try:
            return preprocess_image_bytes(image_bytes, self._image_spec, self._image_limits)
        finally:
            self._metrics.preprocess_latency.labels("image_decode").observe(
                time.perf_counter() - started
            )
