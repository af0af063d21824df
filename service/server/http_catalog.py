"""The catalog's HTTP routes, JSON twins of the catalog RPCs, mounted by `http.py`'s app
through its route wrapper (auth, body bound, concurrency, metrics, errors in OpenAI's
shape). Decode and encode only; `core.catalog` does the work.

    POST /v1/search          {"text" | "image" (base64) | "vector" + "vector_model",
                              "top_k", "filter": {...}, "model", "language"}
                             → {"hits": [{"id", "score", "metadata"}], "model"}
    POST /v1/catalog/items   {"items": [{"id", "text" | "image", "metadata": {...},
                              "model", "language"}], "model"}
                             → {"results": [{"id", "content_sha256"} | {"id", "error"}]}
    POST /v1/catalog/delete  {"ids": [...], "model"} → {"deleted": n}
    POST /v1/catalog/get     {"ids": [...], "model"} → {"items": [{"id", "metadata",
                              "content_sha256"}]}
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.backends.vector_store import MAX_ID_CHARS
from service.core.catalog import AddItem, AddOutcome, Catalog, Query, VectorQuery
from service.core.validation import check_count
from service.errors import InvalidInput, NotConfigured
from service.server.http_schema import decode_image
from service.server.status import caller_message, outcome_for

#: The app's handler shape: the raw body and the call's record (its `model` is set here).
Handler = Callable[[bytes, Any], Awaitable[dict[str, Any]]]
Wrap = Callable[[str, Handler], Callable[[Request], Awaitable[Response]]]
#: The app's bounded JSON-object decoding, off the event loop.
Parse = Callable[[bytes], Awaitable[dict[str, Any]]]
_BodyHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _string(body: Mapping[str, Any], field: str, *, index: int | None = None) -> str:
    value = body.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(
            f"must be a string, not {type(value).__name__}", field=field, index=index
        )
    return value


def _object_json(body: Mapping[str, Any], field: str, index: int | None = None) -> str:
    """An optional JSON object field, re-serialized for the core (which bounds its size)."""
    value = body.get(field)
    if value is None:
        return ""
    if not isinstance(value, dict):
        raise InvalidInput("must be a JSON object ({...})", field=field, index=index)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _ids(body: Mapping[str, Any]) -> list[str]:
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise InvalidInput("must be a list of id strings", field="ids")
    return ids


def _add_item(value: Any, index: int, default_model: str) -> AddItem:
    if not isinstance(value, dict):
        raise InvalidInput(
            "an item is an object {id, text | image, metadata}", field="items", index=index
        )
    has_text, has_image = "text" in value, "image" in value
    if has_text == has_image:
        raise InvalidInput("an item has exactly one of text and image", field="items", index=index)
    content: str | bytes = (
        _string(value, "text", index=index)
        if has_text
        else decode_image(value["image"], "items", index)
    )
    return AddItem(
        id=_string(value, "id", index=index),
        value=content,
        metadata_json=_object_json(value, "metadata", index),
        model=_string(value, "model", index=index) or default_model,
        language=_string(value, "language", index=index) or None,
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


def _query(body: Mapping[str, Any]) -> Query | None:
    given = [k for k in ("text", "image", "vector") if k in body]
    if len(given) != 1:
        raise InvalidInput(
            "send exactly one of text, image (base64) and vector (with vector_model: the "
            f"model id its embedding answer named); got {given or 'none'}",
            field="query",
        )
    if given[0] == "text":
        return _string(body, "text")
    if given[0] == "image":
        return decode_image(body["image"], "image")
    values = body["vector"]
    if not isinstance(values, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise InvalidInput("must be a list of numbers", field="vector")
    return VectorQuery(np.asarray(values, dtype=np.float32), _string(body, "vector_model"))


class CatalogRoutes:
    """The routes over a catalog (None: each answers 501, saying how to enable it)."""

    def __init__(self, catalog: Catalog | None, backend_timeout_s: float) -> None:
        self._catalog = catalog
        self._timeout_s = backend_timeout_s

    def routes(self, wrap: Wrap, parse: Parse) -> list[Route]:
        """Starlette routes, each wrapped by the app's `wrap(name, handler)`, their bodies
        decoded by the app's `parse`."""

        def route(path: str, name: str, handler: _BodyHandler) -> Route:
            async def run(raw: bytes, call: Any) -> dict[str, Any]:
                body = await parse(raw)
                call.model = _string(body, "model")
                return await handler(body)

            return Route(path, wrap(name, run), methods=["POST"])

        return [
            route("/v1/search", "search", self._search),
            route("/v1/catalog/items", "catalog_add", self._add),
            route("/v1/catalog/delete", "catalog_delete", self._delete),
            route("/v1/catalog/get", "catalog_get", self._get),
        ]

    def _require(self) -> Catalog:
        if self._catalog is None:
            raise NotConfigured(
                "this gateway has no catalog: start it with --catalog ./catalog.db (an "
                "embedded Milvus Lite file) or --catalog http://milvus:19530 [env CLIP_CATALOG]"
            )
        return self._catalog

    async def _search(self, body: dict[str, Any]) -> dict[str, Any]:
        catalog = self._require()
        top_k = body.get("top_k") or 0
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise InvalidInput(f"must be an integer, not {top_k!r}", field="top_k")
        result = await catalog.search(
            _string(body, "model"),
            _query(body),
            top_k=top_k,
            filter_json=_object_json(body, "filter"),
            language=_string(body, "language") or None,
            timeout_s=self._timeout_s,
        )
        return {
            "hits": [{"id": h.id, "score": h.score, "metadata": h.metadata} for h in result.hits],
            "model": result.model_id,
        }

    async def _add(self, body: dict[str, Any]) -> dict[str, Any]:
        catalog = self._require()
        raw = body.get("items")
        if not isinstance(raw, list):
            raise InvalidInput("must be a list of items", field="items")
        check_count(len(raw), "items", catalog.limits.max_ids)
        model = _string(body, "model")
        results: list[dict[str, Any] | None] = [None] * len(raw)
        pending = []
        for index, value in enumerate(raw):
            try:
                item = _add_item(value, index, model)
            except InvalidInput as exc:  # per item, as the gRPC stream answers it
                item_id = value.get("id") if isinstance(value, dict) else None
                results[index] = _outcome(AddOutcome(str(item_id or ""), error=exc))
                continue
            pending.append((index, item))
        outcomes = await asyncio.gather(
            *(catalog.add(item, timeout_s=self._timeout_s) for _, item in pending)
        )
        for (index, _), outcome in zip(pending, outcomes, strict=True):
            results[index] = _outcome(outcome)
        return {"results": results}

    async def _delete(self, body: dict[str, Any]) -> dict[str, Any]:
        deleted = await self._require().delete(_string(body, "model"), _ids(body))
        return {"deleted": deleted}

    async def _get(self, body: dict[str, Any]) -> dict[str, Any]:
        found = await self._require().get(_string(body, "model"), _ids(body))
        return {
            "items": [
                {"id": item_id, "metadata": metadata, "content_sha256": sha}
                for item_id, (metadata, sha) in found.items()
            ]
        }
