"""The embedding pipeline: validate → cache lookup → prepare misses → backend → cache fill.

Handlers and health only talk to this class; it owns the backend's and the cache's
lifecycles. Identical misses, within one request or across concurrent ones, are
computed once (`single_flight.py`); the work runs in its own task, so a caller that
cancels does not fail the others waiting on the same key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from opentelemetry import trace

from service.backends.base import Backend
from service.core import lanes, validation
from service.core.admission import Admission, PixelBudget
from service.core.cache import EmbeddingCache
from service.core.cache_keys import embedding_key, label_set_key
from service.core.hf_tokenize import build_tokenizer
from service.core.image_preprocess import (
    PREPROCESS_VERSION,
    ImageLimits,
    ImageSpec,
    PresizedPixels,
    check_pixels,
    preprocess_image_bytes,
    unpack_pixels,
)
from service.core.prompts import ensemble, prompts
from service.core.single_flight import Abandoned, SingleFlight
from service.core.text_tokenize import Tokens
from service.core.validation import Limits
from service.errors import BackendFailure, DeadlineExceeded, InvalidInput
from service.metrics import Metrics
from service.model.metadata import ModelMetadata
from service.telemetry import NO_TRACER

_LOGGER = logging.getLogger(__name__)
# Label sets are embedded in waves of this many prompts so one huge set cannot take the
# whole admission budget at once.
_LABEL_WAVE = 256
# A request retries its shared keys this often when their owners fail on other inputs.
_CLAIM_ATTEMPTS = 3


@dataclass(frozen=True)
class EmbeddingResult:
    """One input's vector and how it was made."""

    vector: np.ndarray
    cached: bool = False
    truncated: bool = False
    #: Token ids the model read of a text (start and end included), where known: set when
    #: this gateway tokenized it, or its LRU kept the count; None for images and for
    #: texts answered by the shared cache (Redis keeps no count).
    tokens: int | None = None


#: Runs prepared inputs on the backend: timeout → one result per input, in order.
Run = Callable[[float | None], Awaitable[list[EmbeddingResult]]]
#: Prepares the inputs at these indexes (decode, tokenize) → how to run them.
Prepare = Callable[[list[int]], Awaitable[Run]]


class Decoding:
    """The decode threads and the pixel budget: one per gateway, shared by every model,
    so that `--decode-threads` and `--decode-budget-pixels` bound the whole process."""

    def __init__(self, threads: int, budget_pixels: int | None) -> None:
        """`budget_pixels` None: decodes are bounded by the thread count only."""
        # One pool per priority lane: an interactive call's decode must not queue behind
        # the window of bulk items a stream keeps in flight (FIFO threads would make it wait
        # for all of them). Bulk threads also run at a lower OS priority, so when the CPUs
        # are the contended part, the kernel gives interactive decoding (and the event
        # loop) the cores first, and bulk the rest.
        self.pools = {
            lane: ThreadPoolExecutor(
                max_workers=threads,
                thread_name_prefix=f"decode-{lane}",
                initializer=_lower_thread_priority if lane == lanes.BULK else None,
            )
            for lane in lanes.LANES
        }
        self.budget = None if budget_pixels is None else PixelBudget(budget_pixels)

    def close(self) -> None:
        """Stop the threads (idempotent: every model sharing them closes them)."""
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class EmbedderOptions:
    """Pipeline knobs that are not caller-facing limits (defaults live in `Settings`)."""

    decode_threads: int
    exif_transpose: bool
    #: None: decodes are bounded by the thread count only.
    decode_budget_pixels: int | None
    text_length_buckets: tuple[int, ...]
    #: Decode large JPEGs at a reduced size (`ImageSpec.fast_jpeg`); not bit-identical.
    fast_jpeg: bool = False


class Embedder:
    """Turns texts and image bytes into vectors, with caching, dedup and admission control."""

    def __init__(
        self,
        *,
        backend: Backend,
        cache: EmbeddingCache,
        label_cache: EmbeddingCache,
        metadata: ModelMetadata,
        limits: Limits,
        metrics: Metrics,
        admission: Admission,
        options: EmbedderOptions,
        decoding: Decoding | None = None,
        tracer: trace.Tracer = NO_TRACER,
    ) -> None:
        """`admission` is shared with the batching queue in front of `backend` (its hold);
        `label_cache` keeps zero-shot label ensembles apart from image and text vectors;
        `decoding` is the gateway's (shared by its models), else one of this model's own
        from `options`; `tracer`: spans of the pipeline's stages (no-op unless tracing is on)."""
        self._tracer = tracer
        self._backend = backend
        self._cache = cache
        self._label_cache = label_cache
        self.metadata = metadata
        self.limits = limits
        self._metrics = metrics
        self._admission = admission
        # The model's own tokenizer and padding rule (CLIP BPE trimmed to buckets, or a HF
        # tokenizer from the repository padded to the full context, ...).
        self.tokenizer = build_tokenizer(metadata, options.text_length_buckets)
        self._image_spec = ImageSpec(
            metadata.image_size, metadata.interpolation, fast_jpeg=options.fast_jpeg
        )
        self._image_limits = ImageLimits(
            limits.max_image_bytes, limits.max_image_pixels, options.exif_transpose
        )
        #: Whether images are rotated by EXIF (what a client making pixels must do too).
        self.exif_transpose = options.exif_transpose
        exif = "exif" if options.exif_transpose else "raw"
        self._image_fingerprint = (
            f"pp{PREPROCESS_VERSION}/{metadata.image_size}/{metadata.interpolation}/{exif}"
            + ("/fastjpeg" if options.fast_jpeg else "")
        )
        # Pre-sized pixels are the prepared input itself: their key depends on nothing
        # but the size (and the model id), and their own kind keeps them apart from keys
        # of encoded bytes.
        self._pixels_fingerprint = f"px/{metadata.image_size}"
        self._decoding = decoding or Decoding(options.decode_threads, options.decode_budget_pixels)
        self._pixel_budget = self._decoding.budget
        self._flights: SingleFlight[str, EmbeddingResult] = SingleFlight()

    @property
    def model_id(self) -> str:
        """Identity of the served weights (responses and cache keys)."""
        return self.metadata.model_id

    @property
    def admitted(self) -> int:
        """Items admitted for the backend and not answered yet (0 when idle)."""
        return self._admission.admitted

    @property
    def backend_name(self) -> str:
        """Where the encoders run ("embedded", "triton")."""
        return self._backend.name

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the backend; it may not be reachable yet (health keeps asking)."""
        try:
            await self._backend.start()
        except Exception as exc:  # e.g. Triton not up yet: health says so, we keep trying
            _LOGGER.warning("backend not started yet: %s", exc)

    async def ready(self) -> bool:
        """Whether the backend says an inference would succeed now."""
        return await self._backend.ready()

    async def warmup(self) -> None:
        """One tiny forward pass per tower, bypassing the cache (proves inference works)."""
        size = self.metadata.image_size
        await self._backend.embed_images(np.zeros((1, 3, size, size), dtype=np.uint8))
        tokens = self.tokenizer.tokenize("warm up")
        # Padded as a request would be (the full context where the graph takes no other).
        ids = self.tokenizer.pad([tokens], self.tokenizer.bucket_length(len(tokens.ids)))
        await self._backend.embed_texts(ids)

    async def aclose(self) -> None:
        """Stop the decode threads, the backend and the cache."""
        self._decoding.close()
        await self._backend.aclose()
        await self._cache.aclose()
        await self._label_cache.aclose()

    # ------------------------------------------------------------------ public API
    async def embed_texts(
        self,
        texts: Sequence[str],
        *,
        timeout_s: float | None = None,
        field: str = "texts",
        language: str | None = None,
    ) -> list[EmbeddingResult]:
        """Vectors for `texts`, in order; validates count, lengths and language first
        (`language`: for towers that take one; None or "": the model's default)."""
        with self._tracer.start_as_current_span("validate"):
            language = self.check_language(language)
            validation.check_texts(texts, self.limits, field)
        return await self._embed_texts(texts, _deadline(timeout_s), language=language)

    def check_language(self, language: str | None) -> str | None:
        """`language` if the model takes it (None for none or ""); InvalidInput otherwise."""
        if not language:
            return None
        known = self.metadata.languages
        if not known:
            raise InvalidInput(
                f"model {self.metadata.model_name} takes no language (got {language[:64]!r})",
                field="language",
            )
        if language not in known:
            raise InvalidInput(
                f"unknown language {language[:64]!r}; this model takes one of "
                f"{', '.join(known[:8])}{', ...' if len(known) > 8 else ''}",
                field="language",
            )
        return language

    def _text_fingerprint(self, language: str | None) -> str:
        fingerprint = self.tokenizer.fingerprint
        return fingerprint if language is None else f"{fingerprint}/lang={language}"

    def check_images(self, images: Sequence[bytes | PresizedPixels], field: str = "images") -> None:
        """Count and sizes of an image batch before any work: encoded bytes within the
        byte limit, pre-sized pixels exactly this model's S·S·3 bytes."""
        validation.check_image_sizes(images, self.limits, field)
        for index, image in enumerate(images):
            if isinstance(image, PresizedPixels):
                try:
                    check_pixels(image, self.metadata.image_size)
                except InvalidInput as exc:
                    raise InvalidInput(exc.reason, field=field, index=index) from None

    def _image_key(self, image: bytes | PresizedPixels) -> str:
        if isinstance(image, PresizedPixels):
            return embedding_key(self.model_id, "pixels", image.data, self._pixels_fingerprint)
        return embedding_key(self.model_id, "image", image, self._image_fingerprint)

    async def embed_images(
        self,
        images: Sequence[bytes | PresizedPixels],
        *,
        timeout_s: float | None = None,
        field: str = "images",
    ) -> list[EmbeddingResult]:
        """Vectors for encoded `images` or pre-sized pixels (they may mix), in order;
        refuses the first bad image by index."""
        with self._tracer.start_as_current_span("validate"):
            self.check_images(images, field)
        keys = [self._image_key(image) for image in images]
        return await self._embed(
            "image",
            keys,
            lambda idx: self._prepare_images(images, idx, field),
            _deadline(timeout_s),
            field,
        )

    async def label_embeddings(
        self,
        labels: Sequence[str],
        templates: Sequence[str],
        *,
        timeout_s: float | None = None,
        language: str | None = None,
    ) -> np.ndarray:
        """`[n_labels, D]`: each label's template ensemble, cached per (label, templates)."""
        deadline = _deadline(timeout_s)
        language = self.check_language(language)
        fp = self._text_fingerprint(language)
        keys = [label_set_key(self.model_id, [label], list(templates), fp) for label in labels]
        size = self.metadata.embedding_dim
        found = [e.vector if e else None for e in await self._label_cache.get_many(keys, size=size)]
        missing = [i for i, vec in enumerate(found) if vec is None]
        if missing:
            texts = [text for i in missing for text in prompts(labels[i], templates)]
            vectors: list[np.ndarray] = []
            for start in range(0, len(texts), _LABEL_WAVE):
                # Prompt vectors are not stored: only the ensembles are worth keeping, and
                # thousands of prompts would evict the image and text vectors callers reuse.
                wave = await self._embed_texts(
                    texts[start : start + _LABEL_WAVE], deadline, store=False, language=language
                )
                vectors.extend(e.vector for e in wave)
            per_label = np.stack(vectors).reshape(len(missing), len(templates), -1)
            fresh = [(keys[i], ensemble(per_label[j])) for j, i in enumerate(missing)]
            for (_, vec), i in zip(fresh, missing, strict=True):
                found[i] = vec
            await self._label_cache.put_many(fresh)
        return np.stack([vec for vec in found if vec is not None])

    # ------------------------------------------------------------------ pipeline
    async def _embed_texts(
        self,
        texts: Sequence[str],
        deadline: float | None,
        *,
        store: bool = True,
        language: str | None = None,
    ) -> list[EmbeddingResult]:
        fingerprint = self._text_fingerprint(language)
        keys = [embedding_key(self.model_id, "text", t.encode("utf-8"), fingerprint) for t in texts]
        return await self._embed(
            "text",
            keys,
            lambda idx: self._prepare_texts(texts, idx, language),
            deadline,
            "texts",
            store,
        )

    async def _embed(
        self,
        modality: str,
        keys: list[str],
        prepare: Prepare,
        deadline: float | None,
        field: str,
        store: bool = True,
    ) -> list[EmbeddingResult]:
        """`store` False: computed vectors are not put in the cache."""
        self._metrics.items.labels(modality, self.metadata.name).inc(len(keys))
        attributes = {"clip.model": self.metadata.name, "clip.modality": modality}
        with self._tracer.start_as_current_span(
            "embed",
            attributes={**attributes, "clip.items": len(keys), "clip.lane": lanes.current()},
        ):
            unique = list(dict.fromkeys(keys))
            for _ in range(_CLAIM_ATTEMPTS):
                _check_deadline(deadline, f"{modality} embedding")
                try:
                    async with asyncio.timeout_at(deadline):
                        results = await self._lookup_or_compute(
                            keys, unique, prepare, deadline, field, store
                        )
                    return [results[k] for k in keys]
                except Abandoned:
                    # Another request owned some of our keys and failed on its own input,
                    # or gave up (its deadline, its cancellation): claim them again, our
                    # budget.
                    continue
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"{modality} embedding passed the caller's deadline"
                    ) from None
            raise BackendFailure(
                "could not embed: concurrent requests kept failing on shared inputs"
            )

    async def _lookup_or_compute(
        self,
        keys: list[str],
        unique: list[str],
        prepare: Prepare,
        deadline: float | None,
        field: str,
        store: bool,
    ) -> dict[str, EmbeddingResult]:
        """Each distinct key's vector: from the LRU, an owner's work, or our own.

        The LRU lookup and the claim happen with no `await` between them, and an owner
        fills the LRU before it releases a key: a key is always either cached or
        claimed, so identical concurrent misses reach the backend once.
        """
        local = self._cache.get_local(unique)
        results = {
            k: EmbeddingResult(e.vector, cached=True, truncated=e.truncated, tokens=e.tokens)
            for k, e in zip(unique, local, strict=True)
            if e is not None
        }
        trace.get_current_span().set_attribute("clip.cache.local_hits", len(results))
        owned, waiting = self._flights.claim(k for k in unique if k not in results)
        if owned:
            await self._start_owned(keys, owned, prepare, deadline, store)
        outcomes = await self._flights.wait({**waiting, **owned})
        for key, outcome in outcomes.items():
            if isinstance(outcome, InvalidInput):
                # Same bytes as the item that failed elsewhere: name our own index.
                raise InvalidInput(outcome.reason, field=field, index=keys.index(key))
            if isinstance(outcome, BaseException):
                raise outcome
            results[key] = outcome
        return results

    async def _start_owned(
        self,
        keys: list[str],
        owned: dict[str, asyncio.Future[EmbeddingResult]],
        prepare: Prepare,
        deadline: float | None,
        store: bool,
    ) -> None:
        """Settle what the shared cache holds; admit, prepare and launch the rest."""
        try:
            with self._tracer.start_as_current_span(
                "cache.lookup", attributes={"clip.items": len(owned)}
            ) as span:
                shared = await self._cache.get_shared(list(owned), size=self.metadata.embedding_dim)
                span.set_attribute("clip.cache_hits", sum(v is not None for v in shared))
        except BaseException as exc:
            self._flights.fail(
                owned, Abandoned() if isinstance(exc, asyncio.CancelledError) else exc
            )
            raise
        hits = {k: v for k, v in zip(owned, shared, strict=True) if v is not None}
        for key, entry in hits.items():
            result = EmbeddingResult(
                entry.vector, cached=True, truncated=entry.truncated, tokens=entry.tokens
            )
            self._flights.resolve(owned, key, result)
        self._flights.release({k: owned[k] for k in hits})  # now in the LRU
        todo = {k: f for k, f in owned.items() if k not in hits}
        if not todo:
            return
        lane = lanes.current()  # the owner's lane: it computes for the waiters too
        try:
            self._admission.admit(len(todo), lane)
        except BaseException as exc:
            self._flights.fail(todo, exc)
            raise
        try:
            run = await prepare([keys.index(k) for k in todo])
        except BaseException as exc:
            # A bad input fails its own key; waiters on the others claim them again, and
            # so do all waiters when this caller was cancelled (never their own error).
            self._admission.release(len(todo), answered=False, lane=lane)
            if isinstance(exc, asyncio.CancelledError):
                self._flights.fail(todo, Abandoned())
            else:
                culprit = None
                if isinstance(exc, InvalidInput) and exc.index is not None:
                    culprit = keys[exc.index]
                self._flights.fail(todo, exc, culprit=culprit)
            raise
        # Its own task: a caller that gives up does not stop the work others wait for.
        task = asyncio.get_running_loop().create_task(
            self._finish(todo, run, deadline, store, lane)
        )
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _finish(
        self,
        owned: dict[str, asyncio.Future[EmbeddingResult]],
        run: Run,
        deadline: float | None,
        store: bool,
        lane: lanes.Lane,
    ) -> None:
        try:
            timeout_s = None if deadline is None else deadline - asyncio.get_running_loop().time()
            embedded = await run(timeout_s)
        except BaseException as exc:
            self._admission.release(len(owned), answered=False, lane=lane)
            # The owner's deadline is not its waiters': they claim the keys again and
            # compute within their own (the owner, past its deadline, stops there).
            shared_error = Abandoned() if isinstance(exc, DeadlineExceeded) else exc
            self._flights.fail(owned, shared_error)
            raise
        self._admission.release(len(owned), lane=lane)  # out of the backend: not queued work
        for key, item in zip(owned, embedded, strict=True):
            self._flights.resolve(owned, key, item)
        try:
            # Keys stay claimed until the cache holds them, so a late identical miss
            # finds either the claim or the cached vector, never a gap between the two.
            if store:
                with self._tracer.start_as_current_span(
                    "cache.store", attributes={"clip.items": len(owned)}
                ):
                    await self._cache.put_many(
                        [(k, e.vector) for k, e in zip(owned, embedded, strict=True)],
                        truncated=[e.truncated for e in embedded],
                        tokens=[e.tokens for e in embedded],
                    )
        finally:
            self._flights.release(owned)

    # ------------------------------------------------------------------ preparation
    async def _prepare_texts(
        self, texts: Sequence[str], indices: list[int], language: str | None = None
    ) -> Run:
        # Off the event loop: a batch of long texts must not delay health checks.
        with self._tracer.start_as_current_span(
            "tokenize", attributes={"clip.items": len(indices)}
        ):
            tokens = await asyncio.get_running_loop().run_in_executor(
                self._decoding.pools[lanes.current()],
                self._tokenize,
                [texts[i] for i in indices],
                language,
            )

        async def run(timeout_s: float | None) -> list[EmbeddingResult]:
            return await self._run_texts(tokens, timeout_s)

        return run

    async def _run_texts(
        self, tokens: list[Tokens], timeout_s: float | None
    ) -> list[EmbeddingResult]:
        # Pad each text only to its bucket edge; same-length rows batch together.
        by_length: dict[int, list[int]] = {}
        for i, t in enumerate(tokens):
            by_length.setdefault(self.tokenizer.bucket_length(len(t.ids)), []).append(i)
        groups = list(by_length.items())
        outputs = await asyncio.gather(
            *(
                self._backend.embed_texts(
                    self.tokenizer.pad([tokens[i] for i in members], length), timeout_s=timeout_s
                )
                for length, members in groups
            )
        )
        vectors: list[np.ndarray | None] = [None] * len(tokens)
        for (_, members), out in zip(groups, outputs, strict=True):
            for row, i in enumerate(members):
                vectors[i] = out[row]
        return [
            EmbeddingResult(
                np.asarray(v, dtype=np.float32), truncated=t.truncated, tokens=len(t.ids)
            )
            for v, t in zip(vectors, tokens, strict=True)
        ]

    async def _prepare_images(
        self, images: Sequence[bytes | PresizedPixels], indices: list[int], field: str
    ) -> Run:
        loop = asyncio.get_running_loop()
        size = self.metadata.image_size
        # Pre-sized pixels are only viewed as [3,S,S] (no copy, no thread, no task: at
        # GPU rates a task per image is a measurable share of the gateway's CPU).
        encoded = [i for i in indices if not isinstance(images[i], PresizedPixels)]
        pool = self._decoding.pools[lanes.current()]
        with self._tracer.start_as_current_span("decode", attributes={"clip.items": len(indices)}):
            decoded = await asyncio.gather(
                *(loop.run_in_executor(pool, self._decode, images[i]) for i in encoded),
                return_exceptions=True,
            )
        by_index = dict(zip(encoded, decoded, strict=True))
        arrays: list[np.ndarray] = []
        for i in indices:
            image = images[i]
            result = (
                unpack_pixels(image, size) if isinstance(image, PresizedPixels) else by_index[i]
            )
            if isinstance(result, InvalidInput):
                raise InvalidInput(result.reason, field=field, index=i)
            if isinstance(result, BaseException):
                raise result
            arrays.append(result)
        pixels = np.stack(arrays)

        async def run(timeout_s: float | None) -> list[EmbeddingResult]:
            out = await self._backend.embed_images(pixels, timeout_s=timeout_s)
            return [EmbeddingResult(np.asarray(v, dtype=np.float32)) for v in out]

        return run

    async def count_tokens(self, texts: Sequence[str], language: str | None = None) -> list[int]:
        """Token ids the model reads of each text (start and end included, cut at the
        context), counted on the decode threads: the event loop keeps answering meanwhile.
        The callers' texts were checked against the limits already (count, length)."""
        tokens = await asyncio.get_running_loop().run_in_executor(
            self._decoding.pools[lanes.current()], self._tokenize, list(texts), language
        )
        return [len(t.ids) for t in tokens]

    def _tokenize(self, texts: list[str], language: str | None = None) -> list[Tokens]:
        started = time.perf_counter()
        try:
            return [self.tokenizer.tokenize(text, language) for text in texts]
        finally:
            self._metrics.preprocess_latency.labels("tokenize").observe(
                time.perf_counter() - started
            )

    def _decode(self, image_bytes: bytes) -> np.ndarray:
        started = time.perf_counter()
        try:
            return preprocess_image_bytes(
                image_bytes, self._image_spec, self._image_limits, self._pixel_budget
            )
        finally:
            self._metrics.preprocess_latency.labels("image_decode").observe(
                time.perf_counter() - started
            )


#: `nice` increment of bulk decode threads (CFS weight 110 against 1024 at 0: about a tenth
#: of a core's share when an interactive thread wants the same core).
BULK_DECODE_NICE = 10


def _lower_thread_priority() -> None:
    """Lower the calling thread's OS scheduling priority (Linux: nice is per thread)."""
    with contextlib.suppress(OSError, AttributeError):  # not permitted, or not Linux
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_DECODE_NICE)


def _deadline(timeout_s: float | None) -> float | None:
    """A caller's budget in seconds → the event loop's time when it ends (None: none)."""
    return None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and asyncio.get_running_loop().time() >= deadline:
        raise DeadlineExceeded(f"{what} passed the caller's deadline")
