"""The catalog's HTTP routes, JSON twins of the catalog RPCs, mounted by `http.py`'s app
through its route wrapper (auth, body bound, concurrency, metrics, errors in OpenAI's
shape). Decode and encode only; `core.catalog` does the work.

    POST /v1/search          {"text" | "image" (base64, data: URI or URL) | "pixels"
                              (base64) | "vector" + "vector_model" | "item_id",
                              "top_k", "filter": {...}, "model", "language"}
                             → {"hits": [{"id", "score", "metadata"}], "model"}
    POST /v1/catalog/items   {"items": [{"id", "text" | "image" (as above) | "pixels"
                              (+ "source_sha256"), "metadata": {...}, "model",
                              "language"}], "model"}
                             → {"results": [{"id", "content_sha256"} | {"id", "error"}]}
    POST /v1/catalog/delete  {"ids": [...], "model"} → {"deleted": n}
    POST /v1/catalog/get     {"ids": [...], "model"} → {"items": [{"id", "metadata",
                              "content_sha256"}]}

An image URL is fetched by the app's fetcher (only from `--image-url-allow` hosts, as on
/v1/embeddings); an item whose fetch fails gets that error alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.backends.vector_store import MAX_ID_CHARS
from service.core.catalog import AddItem, AddOutcome, Catalog, ItemQuery, Query, VectorQuery
from service.core.image_preprocess import PresizedPixels
from service.core.validation import check_count
from service.errors import InvalidInput, NotConfigured
from service.server.http_schema import ImageUrl, decode_image, image_string, text_input
from service.server.status import caller_message, outcome_for

#: The app's handler shape: the raw body and the call's record (its `model` is set here).
Handler = Callable[[bytes, Any], Awaitable[dict[str, Any]]]
Wrap = Callable[[str, Handler], Callable[[Request], Awaitable[Response]]]
B = TypeVar("B", bound="_Body")
#: The app's bounded decoding of a body into a struct type, off the event loop.
Parse = Callable[[bytes, type[B]], Awaitable[B]]
#: The app's image URL fetching: (model, values, field, per_item=, indexed=) → the values
#: with each `ImageUrl` replaced by its bytes (or, per item, its error), held in the
#: request budget while the block runs.
Fetched = Callable[..., AbstractAsyncContextManager[list[Any]]]


# The bodies, typed: a value of a wrong type is a 400 naming its path, and a field a
# route does not take is a 400 naming it (never silently ignored), as on the other routes.
class _Body(msgspec.Struct, forbid_unknown_fields=True):
    model: str | None = None


class _SearchBody(_Body):
    text: str | None = None
    image: str | None = None
    pixels: str | None = None
    vector: list[float] | None = None
    vector_model: str | None = None
    item_id: str | None = None
    top_k: int | None = None  # null or 0: the default
    filter: dict[str, Any] | None = None
    language: str | None = None


class _AddItemBody(msgspec.Struct, forbid_unknown_fields=True):
    id: str = ""
    text: str | None = None
    image: str | None = None
    pixels: str | None = None
    source_sha256: str | None = None
    metadata: dict[str, Any] | None = None
    model: str | None = None
    language: str | None = None


class _AddBody(_Body, kw_only=True):
    items: list[_AddItemBody]


class _IdsBody(_Body, kw_only=True):
    ids: list[str]


def _object_json(value: dict[str, Any] | None) -> str:
    """An optional JSON object field, re-serialized for the core (which bounds its size)."""
    return "" if value is None else msgspec.json.encode(value).decode()


def _content(
    value: _AddItemBody | _SearchBody, field: str, index: int | None
) -> str | bytes | ImageUrl | PresizedPixels | None:
    """The item's or query's text, encoded image (base64, a data: URI, or a URL to fetch)
    or pixels (base64), whichever is set."""
    if value.text is not None:
        return text_input(value.text, field, index)
    if value.image is not None:
        return image_string(value.image, field, index, strict=False)
    if value.pixels is not None:
        return PresizedPixels(decode_image(value.pixels, field, index))
    return None


def _add_item(value: _AddItemBody, index: int, default_model: str) -> AddItem:
    given = [k for k in ("text", "image", "pixels") if getattr(value, k) is not None]
    if len(given) != 1:
        raise InvalidInput(
            f"an item has exactly one of text, image and pixels; got {given or 'none'}",
            field="items",
            index=index,
        )
    return AddItem(
        id=value.id,
        value=_content(value, "items", index),
        metadata_json=_object_json(value.metadata),
        model=value.model or default_model,
        language=value.language or None,
        source_sha256=value.source_sha256 or "",
    )


def _outcome(outcome: AddOutcome) -> dict[str, Any]:
    if outcome.error is None:
        return {"id": outcome.id, "content_sha256": outcome.content_sha256}
    return {
        "id": outcome.id[:MAX_ID_CHARS],
        "error": {
            "code": outcome_for(outcome.error).code.name,
            "message": caller_message(outcome.error),
        },
    }


def _query(body: _SearchBody) -> Query | ImageUrl:
    kinds = ("text", "image", "pixels", "vector", "item_id")
    given = [k for k in kinds if getattr(body, k) is not None]
    if len(given) != 1:
        raise InvalidInput(
            "send exactly one of text, image (base64), pixels (base64), vector (with "
            "vector_model: the model id its embedding answer named) and item_id (items "
            f"like a stored one); got {given or 'none'}",
            field="query",
        )
    if body.item_id is not None:
        return ItemQuery(body.item_id)
    if body.vector is not None:
        return VectorQuery(np.asarray(body.vector, dtype=np.float32), body.vector_model or "")
    return _content(body, given[0], None)  # type: ignore[return-value]


class CatalogRoutes:
    """The routes over a catalog (None: each answers 501, saying how to enable it)."""

    def __init__(self, catalog: Catalog | None, backend_timeout_s: float) -> None:
        self._catalog = catalog
        self._timeout_s = backend_timeout_s
        self._fetched: Fetched | None = None  # the app's, given with `routes()`

    def routes(self, wrap: Wrap, parse: Parse[Any], fetched: Fetched) -> list[Route]:
        """Starlette routes, each wrapped by the app's `wrap(name, handler)`, their bodies
        decoded by the app's `parse`, image URLs fetched by its `fetched`."""
        self._fetched = fetched

        def route(path: str, name: str, kind: type[B], handler: Callable[[B], Any]) -> Route:
            async def run(raw: bytes, call: Any) -> dict[str, Any]:
                body = await parse(raw, kind)
                call.model = body.model or ""
                answer: dict[str, Any] = await handler(body)
                return answer

            return Route(path, wrap(name, run), methods=["POST"])

        return [
            route("/v1/search", "search", _SearchBody, self._search),
            route("/v1/catalog/items", "catalog_add", _AddBody, self._add),
            route("/v1/catalog/delete", "catalog_delete", _IdsBody, self._delete),
            route("/v1/catalog/get", "catalog_get", _IdsBody, self._get),
        ]

    def _require(self) -> Catalog:
        if self._catalog is None:
            raise NotConfigured(
                "this gateway has no catalog: start it with --catalog ./catalog.db (an "
                "embedded Milvus Lite file) or --catalog http://milvus:19530 [env CLIP_CATALOG]"
            )
        return self._catalog

    async def _search(self, body: _SearchBody) -> dict[str, Any]:
        catalog = self._require()
        query = _query(body)
        async with self._fetched(body.model or "", [query], "image", indexed=False) as fetched:
            result = await catalog.search(
                body.model or "",
                fetched[0],
                top_k=body.top_k or 0,
                filter_json=_object_json(body.filter),
                language=body.language or None,
                timeout_s=self._timeout_s,
            )
        return {
            "hits": [{"id": h.id, "score": h.score, "metadata": h.metadata} for h in result.hits],
            "model": result.model_id,
        }

    async def _add(self, body: _AddBody) -> dict[str, Any]:
        catalog = self._require()
        check_count(len(body.items), "items", catalog.limits.max_ids)
        model = body.model or ""
        results: list[dict[str, Any] | None] = [None] * len(body.items)
        pending = []
        for index, value in enumerate(body.items):
            try:
                item = _add_item(value, index, model)
            except InvalidInput as exc:  # per item, as the gRPC stream answers it
                results[index] = _outcome(AddOutcome(value.id, error=exc))
                continue
            pending.append((index, item))
        values: list[Any] = [None] * len(body.items)
        for index, item in pending:
            values[index] = item.value
        async with self._fetched(model, values, "items", per_item=True) as fetched:
            ready = []
            for index, item in pending:
                value = fetched[index]
                if isinstance(value, BaseException):  # its URL could not be fetched
                    results[index] = _outcome(AddOutcome(item.id, error=value))
                else:
                    ready.append((index, dataclasses.replace(item, value=value)))
            outcomes = await asyncio.gather(
                *(catalog.add(item, timeout_s=self._timeout_s) for _, item in ready)
            )
        for (index, _), outcome in zip(ready, outcomes, strict=True):
            results[index] = _outcome(outcome)
        return {"results": results}

    async def _delete(self, body: _IdsBody) -> dict[str, Any]:
        deleted = await self._require().delete(body.model or "", body.ids)
        return {"deleted": deleted}

    async def _get(self, body: _IdsBody) -> dict[str, Any]:
        found = await self._require().get(body.model or "", body.ids)
        return {
            "items": [
                {"id": item_id, "metadata": metadata, "content_sha256": sha}
                for item_id, (metadata, sha) in found.items()
            ]
        }
