"""The catalog: items embedded by a served model and kept in that model's collection of a
vector store, searched by text, image or vector. No transport here: gRPC and HTTP decode
into these calls and encode their answers.

Vectors of two models never meet: each served model has its own collection, named from
its model id (and recorded with it in the store, so a collection made for another model
is refused at start), items are embedded by the model they name, queries search only
that model's collection, and a query vector must say which model made it.

Engine calls block: they run on the catalog's own threads, never on the event loop.
Writes from every stream and request are gathered by one writer into batches (one
engine round trip for many items).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from service.backends.vector_store import MAX_ID_CHARS, StoredItem, StoreHit, VectorStore
from service.core.embedder import Embedder
from service.core.image_preprocess import PresizedPixels
from service.core.models import ModelRegistry
from service.core.validation import check_count
from service.errors import BackendFailure, InvalidInput, ItemNotFound, NotConfigured

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")

#: top_k when a search names none.
DEFAULT_TOP_K = 10
# Items one engine upsert takes; more wait for the next round trip.
_WRITE_BATCH = 256
# Engine calls at once (searches, reads and the writer's upserts).
_ENGINE_THREADS = 4


@dataclass(frozen=True)
class CatalogLimits:
    """The catalog's caller-facing limits (their meaning lives in `Settings`)."""

    max_top_k: int
    max_metadata_bytes: int
    max_ids: int


@dataclass(frozen=True)
class AddItem:
    """One item to add or replace: `value` is a text (str), an encoded image (bytes) or
    pre-sized pixels; `source_sha256`, with pixels only, names the file they were made
    from (stored as the item's content hash in place of the pixels')."""

    id: str
    value: str | bytes | PresizedPixels | None
    metadata_json: str = ""
    model: str = ""
    language: str | None = None
    source_sha256: str = ""


@dataclass(frozen=True)
class AddOutcome:
    """What became of one item: stored (error None) or refused with `error`."""

    id: str
    error: BaseException | None = None
    content_sha256: str = ""


@dataclass(frozen=True)
class VectorQuery:
    """A query vector and the model id that made it (an embedding answer's `model`)."""

    values: np.ndarray
    model_id: str


@dataclass(frozen=True)
class ItemQuery:
    """ "More like this": the stored vector of the catalog's item `id` is the query, and
    the item itself is left out of the hits."""

    id: str


Query = str | bytes | PresizedPixels | VectorQuery | ItemQuery


@dataclass(frozen=True)
class SearchResult:
    """Hits best first, and the model id of the collection searched."""

    hits: list[StoreHit]
    model_id: str


def collection_name(model_id: str, model_name: str) -> str:
    """The collection of `model_id`: readable prefix, a hash of the full id (Milvus names
    take letters, digits and '_', up to 255)."""
    slug = re.sub(r"[^A-Za-z0-9_]", "_", model_name)[:48]
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:16]
    return f"clip_{slug}_{digest}"


def content_sha256(value: str | bytes | PresizedPixels) -> str:
    """SHA-256 (hex) of what is embedded: image bytes, a text's UTF-8, or the pixels."""
    if isinstance(value, PresizedPixels):
        value = value.data
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _stored_hash(item: AddItem) -> str:
    """The content hash an item is stored with: the caller's `source_sha256` for pixels
    (so an unchanged file is known without decoding it again), else its own."""
    if not item.source_sha256:
        return content_sha256(item.value)  # type: ignore[arg-type]  # not None: checked
    if not isinstance(item.value, PresizedPixels):
        raise InvalidInput(
            "source_sha256 goes with pixels only (the gateway hashes texts and images "
            "itself); leave it empty",
            field="source_sha256",
        )
    if not _SHA256_HEX.fullmatch(item.source_sha256):
        raise InvalidInput(
            "source_sha256 is not a SHA-256 in hex (64 characters 0-9, a-f)",
            field="source_sha256",
        )
    return item.source_sha256


class Catalog:
    """Add, delete, get and search items of the served models' collections."""

    def __init__(self, models: ModelRegistry, store: VectorStore, limits: CatalogLimits) -> None:
        """Nothing is called yet: `open()` creates or checks the collections."""
        self._models = models
        self._store = store
        self.limits = limits
        self._executor = ThreadPoolExecutor(_ENGINE_THREADS, thread_name_prefix="catalog")
        self._pending: asyncio.Queue[tuple[str, StoredItem, asyncio.Future[None]]] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._names = {
            m.name: collection_name(m.embedder.model_id, m.embedder.metadata.model_name)
            for m in models
        }

    @property
    def index_description(self) -> str:
        """The store's index settings, for logs."""
        return self._store.index.describe()

    async def open(self) -> None:
        """Create each model's collection, or check an existing one is that model's."""
        for model in self._models:
            meta = model.embedder.metadata
            await self._run(
                lambda m=model, d=meta.embedding_dim: self._store.open_collection(
                    self._names[m.name], dim=d, model_id=m.embedder.model_id
                )
            )
        self._pending = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop(), name="catalog-writer")

    async def aclose(self) -> None:
        """Stop the writer (items not yet written fail) and close the store."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        await asyncio.get_running_loop().run_in_executor(self._executor, self._store.close)
        self._executor.shutdown(wait=False)

    # ------------------------------------------------------------------ items
    async def add(self, item: AddItem, *, timeout_s: float) -> AddOutcome:
        """Embed and store one item; every failure is returned, not raised (per item)."""
        try:
            stored_sha = await self._add(item, timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return AddOutcome(item.id, error=exc)
        return AddOutcome(item.id, content_sha256=stored_sha)

    async def _add(self, item: AddItem, timeout_s: float) -> str:
        _check_id(item.id)
        metadata = self._parse_metadata(item.metadata_json)
        if item.value is None:
            raise InvalidInput("item has no text, image or pixels set")
        digest = _stored_hash(item)  # before the embedding: a bad hash costs none
        model = self._models.get(item.model)
        embedder = model.embedder
        if isinstance(item.value, str):
            results = await embedder.embed_texts(
                [item.value], timeout_s=timeout_s, field="text", language=item.language
            )
        elif isinstance(item.value, bytes | PresizedPixels):
            embedder.check_language(item.language)
            field = "pixels" if isinstance(item.value, PresizedPixels) else "image"
            results = await embedder.embed_images([item.value], timeout_s=timeout_s, field=field)
        else:
            raise InvalidInput(f"item input of type {type(item.value).__name__} is not embeddable")
        stored = StoredItem(item.id, results[0].vector, metadata, digest)
        await self._write(self._names[model.name], stored)
        return digest

    async def _write(self, collection: str, item: StoredItem) -> None:
        if self._pending is None:
            raise NotConfigured("the catalog is not open")
        if self._writer is None or self._writer.done():
            # A bug ended the writer: say so instead of waiting for it for ever.
            raise BackendFailure("the catalog's writer stopped", source="the catalog writer")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.put_nowait((collection, item, done))
        await done

    async def _write_loop(self) -> None:
        """Take what is waiting (up to a batch), one upsert per collection, answer each."""
        assert self._pending is not None
        while True:
            batch = [await self._pending.get()]
            while len(batch) < _WRITE_BATCH and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            by_collection: dict[str, list[tuple[StoredItem, asyncio.Future[None]]]] = {}
            for collection, item, done in batch:
                if not done.done():  # the caller is gone: nothing to store for it
                    by_collection.setdefault(collection, []).append((item, done))
            for collection, entries in by_collection.items():
                # Last write of an id wins within a batch (upsert rejects duplicate ids).
                rows = list({item.id: item for item, _ in entries}.values())
                try:
                    await self._run(functools.partial(self._store.upsert, collection, rows))
                except Exception as exc:
                    for _, done in entries:
                        if not done.done():
                            done.set_exception(exc)
                else:
                    for _, done in entries:
                        if not done.done():
                            done.set_result(None)

    def _parse_metadata(self, metadata_json: str) -> dict[str, Any]:
        if not metadata_json:
            return {}
        size = len(metadata_json.encode())
        if size > self.limits.max_metadata_bytes:
            raise InvalidInput(
                f"metadata is {size} bytes, over the limit of {self.limits.max_metadata_bytes}",
                field="metadata",
            )
        return _json_object(metadata_json, "metadata")

    async def delete(self, model_name: str, ids: Sequence[str]) -> int:
        """Delete `ids` from `model_name`'s collection; how many were there."""
        collection = self._collection(model_name)
        self._check_ids(ids)
        return await self._run(lambda: self._store.delete(collection, list(ids)))

    async def get(
        self, model_name: str, ids: Sequence[str]
    ) -> dict[str, tuple[dict[str, Any], str]]:
        """Stored ids among `ids` → (metadata, content_sha256)."""
        collection = self._collection(model_name)
        self._check_ids(ids)
        return await self._run(lambda: self._store.get(collection, list(ids)))

    async def count(self, model_name: str) -> int:
        """Items stored in `model_name`'s collection (each id once, by the engine's count)."""
        collection = self._collection(model_name)
        return await self._run(lambda: self._store.count(collection))

    def _check_ids(self, ids: Sequence[str]) -> None:
        check_count(len(ids), "ids", self.limits.max_ids)
        for index, item_id in enumerate(ids):
            _check_id(item_id, index)

    # ------------------------------------------------------------------ search
    async def search(
        self,
        model_name: str,
        query: Query | None,
        *,
        top_k: int = 0,
        filter_json: str = "",
        language: str | None = None,
        timeout_s: float,
    ) -> SearchResult:
        """The `top_k` items nearest `query` by cosine in `model_name`'s collection."""
        collection = self._collection(model_name)
        embedder = self._models.get(model_name).embedder
        k = DEFAULT_TOP_K if top_k == 0 else top_k
        if not 1 <= k <= self.limits.max_top_k:
            raise InvalidInput(
                f"top_k is {top_k}; ask for 1 to {self.limits.max_top_k} hits "
                "(--catalog-max-top-k)",
                field="top_k",
            )
        if len(filter_json.encode()) > self.limits.max_metadata_bytes:
            raise InvalidInput(
                f"the filter is over {self.limits.max_metadata_bytes} bytes "
                "(--catalog-max-metadata-bytes)",
                field="filter",
            )
        conditions = _json_object(filter_json, "filter") if filter_json else None
        if isinstance(query, ItemQuery):
            vector = await self._item_vector(collection, query.id, model_name)
            # One more, as the item finds itself first (unless a filter leaves it out).
            hits = await self._run(
                lambda: self._store.search(collection, vector, k + 1, conditions)
            )
            return SearchResult([h for h in hits if h.id != query.id][:k], embedder.model_id)
        vector = await self._query_vector(embedder, query, language, timeout_s)
        hits = await self._run(lambda: self._store.search(collection, vector, k, conditions))
        return SearchResult(hits, embedder.model_id)

    async def _item_vector(self, collection: str, item_id: str, model_name: str) -> np.ndarray:
        if not 0 < len(item_id) <= MAX_ID_CHARS:
            raise InvalidInput(
                f"item_id is {len(item_id)} characters; an id has 1 to {MAX_ID_CHARS}",
                field="item_id",
            )
        vector = await self._run(lambda: self._store.vector(collection, item_id))
        if vector is None:
            raise ItemNotFound(
                f"no item {item_id!r} in the catalog of model "
                f"{self._models.get(model_name).name!r} to search like"
            )
        return vector

    async def _query_vector(
        self, embedder: Embedder, query: Query | None, language: str | None, timeout_s: float
    ) -> np.ndarray:
        if isinstance(query, str):
            results = await embedder.embed_texts(
                [query], timeout_s=timeout_s, field="text", language=language
            )
            return results[0].vector
        if isinstance(query, bytes | PresizedPixels):
            embedder.check_language(language)
            field = "pixels" if isinstance(query, PresizedPixels) else "image"
            results = await embedder.embed_images([query], timeout_s=timeout_s, field=field)
            return results[0].vector
        if isinstance(query, VectorQuery):
            return _checked_vector(query, embedder)
        raise InvalidInput(
            "the search has no query: send a text, an image, pixels, a vector or an item_id"
        )

    def _collection(self, model_name: str) -> str:
        if self._pending is None:
            raise NotConfigured("the catalog is not open")
        return self._names[self._models.get(model_name).name]

    async def _run(self, call: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)


def _checked_vector(query: VectorQuery, embedder: Embedder) -> np.ndarray:
    """The query vector, if it is of this catalog's model and usable for cosine."""
    model_id = embedder.model_id
    if not query.model_id:
        raise InvalidInput(
            f"a query vector must name the model that made it (model_id: an embedding "
            f"answer's `model`); this catalog holds vectors of {model_id}",
            field="vector.model_id",
        )
    if query.model_id != model_id:
        raise InvalidInput(
            f"the query vector was made by {query.model_id[:200]}, but this catalog holds "
            f"vectors of {model_id}; vectors of two models are not comparable: embed the "
            "query with this catalog's model, or search the catalog of the vector's model",
            field="vector.model_id",
        )
    vector = np.asarray(query.values, dtype=np.float32)
    dim = embedder.metadata.embedding_dim
    if vector.shape != (dim,):
        raise InvalidInput(
            f"the query vector has {vector.size} values; this model's have {dim}",
            field="vector",
        )
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm == 0.0:
        raise InvalidInput("the query vector must be finite and not all zeros", field="vector")
    return vector / norm


def _check_id(item_id: str, index: int | None = None) -> None:
    field = "ids" if index is not None else "id"
    if not item_id:
        raise InvalidInput("the id is empty; every item needs one", field=field, index=index)
    if len(item_id) > MAX_ID_CHARS:
        raise InvalidInput(
            f"the id is {len(item_id)} characters, over the limit of {MAX_ID_CHARS}",
            field=field,
            index=index,
        )


def _json_object(text: str, field: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"not valid JSON: {exc.msg} at column {exc.colno}", field=field
        ) from None
    if not isinstance(value, dict):
        raise InvalidInput("must be a JSON object ({...})", field=field)
    return value
