"""The catalog RPCs of `clip.v1.ClipService` (CatalogAdd, CatalogDelete, CatalogGet,
Search): proto ⇄ `core.catalog`, nothing else. Mixed into `ClipServicer`.

Errors are raised and mapped by the interceptor, except CatalogAdd's per-item errors,
which are answered in the stream (as EmbedStream's) while the stream goes on.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import grpc
import numpy as np

from service.api.clip.v1 import clip_pb2
from service.backends.vector_store import MAX_ID_CHARS
from service.core.catalog import AddItem, AddOutcome, Catalog, ItemQuery, Query, VectorQuery
from service.core.image_preprocess import PresizedPixels
from service.errors import NotConfigured
from service.server.status import caller_message, status_for
from service.server.streams import answer_stream

_NO_CATALOG = (
    "this gateway has no catalog: start it with --catalog ./catalog.db (an embedded Milvus "
    "Lite file) or --catalog http://milvus:19530 [env CLIP_CATALOG]"
)


def _metadata_json(metadata: dict[str, object]) -> str:
    return json.dumps(metadata, ensure_ascii=False, separators=(",", ":")) if metadata else ""


class CatalogRpcs:
    """The catalog's RPCs; the servicer provides `_catalog` and `_timeout`."""

    _catalog: Catalog | None

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        raise NotImplementedError

    def _require_catalog(self) -> Catalog:
        if self._catalog is None:
            raise NotConfigured(_NO_CATALOG)
        return self._catalog

    async def CatalogAdd(
        self,
        request_iterator: AsyncIterator[clip_pb2.CatalogItem],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[clip_pb2.CatalogAddResult]:
        catalog = self._require_catalog()

        async def add(request: clip_pb2.CatalogItem) -> clip_pb2.CatalogAddResult:
            item = AddItem(
                id=request.id,
                value=_input(request, request.WhichOneof("input")),
                metadata_json=request.metadata_json,
                model=request.model,
                language=request.language or None,
                source_sha256=request.source_sha256,
            )
            return _add_result(await catalog.add(item, timeout_s=self._timeout(context)))

        async with contextlib.aclosing(answer_stream(request_iterator, add)) as answers:
            async for answer in answers:
                yield answer

    async def CatalogDelete(
        self, request: clip_pb2.CatalogDeleteRequest, context: grpc.aio.ServicerContext
    ) -> clip_pb2.CatalogDeleteResponse:
        deleted = await self._require_catalog().delete(request.model, list(request.ids))
        return clip_pb2.CatalogDeleteResponse(deleted=deleted)

    async def CatalogGet(
        self, request: clip_pb2.CatalogGetRequest, context: grpc.aio.ServicerContext
    ) -> clip_pb2.CatalogGetResponse:
        found = await self._require_catalog().get(request.model, list(request.ids))
        return clip_pb2.CatalogGetResponse(
            entries=[
                clip_pb2.CatalogEntry(
                    id=item_id, metadata_json=_metadata_json(metadata), content_sha256=sha
                )
                for item_id, (metadata, sha) in found.items()
            ]
        )

    async def Search(
        self, request: clip_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> clip_pb2.SearchResponse:
        catalog = self._require_catalog()
        kind = request.WhichOneof("query")
        query: Query | None = _input(request, kind)
        if kind == "vector":
            query = VectorQuery(
                np.asarray(request.vector.values, dtype=np.float32), request.vector.model_id
            )
        elif kind == "item_id":
            query = ItemQuery(request.item_id)
        result = await catalog.search(
            request.model,
            query,
            top_k=request.top_k,
            filter_json=request.filter_json,
            language=request.language or None,
            timeout_s=self._timeout(context),
        )
        return clip_pb2.SearchResponse(
            hits=[
                clip_pb2.SearchHit(id=h.id, score=h.score, metadata_json=_metadata_json(h.metadata))
                for h in result.hits
            ],
            model=result.model_id,
        )


def _input(
    request: clip_pb2.CatalogItem | clip_pb2.SearchRequest, kind: str | None
) -> str | bytes | PresizedPixels | None:
    """A text, an encoded image or pre-sized pixels, by which of them the message set."""
    if kind == "text":
        return request.text
    if kind == "image":
        return request.image
    return PresizedPixels(request.pixels) if kind == "pixels" else None


def _add_result(outcome: AddOutcome) -> clip_pb2.CatalogAddResult:
    if outcome.error is None:
        return clip_pb2.CatalogAddResult(id=outcome.id, content_sha256=outcome.content_sha256)
    exc = outcome.error
    return clip_pb2.CatalogAddResult(
        id=outcome.id[:MAX_ID_CHARS],
        error=clip_pb2.StreamError(code=status_for(exc).name, message=caller_message(exc)),
    )
