"""`VectorStore` on Milvus, through pymilvus's `MilvusClient` (types in `vector_store.py`).

One client API for both shapes: Milvus Lite's engine on a local file (started by
`service.processes.milvus_lite`, reached on a unix socket) and a Milvus server or
cluster (`http://host:19530`). Every call blocks (pymilvus is synchronous): the caller
(`core/catalog.py`) runs them on its own threads, never on the event loop. Every call
carries a timeout: pymilvus otherwise retries a failing call with backoff for ever
(checked: an expression the engine cannot run hung `search` with no timeout).

Schema of an item collection: `id` (VARCHAR primary key: upsert replaces), `vector`
(FLOAT_VECTOR, COSINE), `metadata` (JSON), `content_sha256` (VARCHAR: what was embedded,
so an indexer can skip unchanged files). A small `clip_catalogs` collection records
which model id and dimension each item collection was made for: Milvus Lite 2.5.1 keeps
no collection description and does not implement collection properties (checked).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from service.extras import MissingExtra

try:
    from pymilvus import DataType, MilvusClient, MilvusException
    from pymilvus.client.types import Status
except ImportError as exc:  # the gateway install leaves the catalog's client out
    raise MissingExtra("catalog", "--catalog", exc.name) from exc

from service.backends.vector_store import (
    MAX_ID_CHARS,
    IndexSettings,
    StoredItem,
    StoreHit,
    filter_expression,
)
from service.errors import BackendFailure, BackendUnavailable, DeadlineExceeded, ModelMismatch

_LOGGER = logging.getLogger(__name__)
# pymilvus logs every failed call with two full tracebacks (~60 lines) before raising;
# each failure is raised here as the gateway's own error and logged once, by the status
# layer. An engine that is down for a few seconds would otherwise bury the log.
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)

# Id bytes: 4 per character at most in UTF-8 (the VARCHAR's bound is in bytes).
_ID_BYTES = 4 * MAX_ID_CHARS
_REGISTRY = "clip_catalogs"
# Milvus wants a vector field in every collection; the registry's is never searched.
_REGISTRY_DIM = 2


class MilvusStore:
    """Item collections on one Milvus (Lite or server); blocking, thread-safe calls."""

    def __init__(
        self,
        uri: str,
        *,
        token: str = "",
        index: IndexSettings,
        timeout_s: float = 30.0,
        sole_writer: bool = False,
    ) -> None:
        """Connect (blocking; raises BackendUnavailable when nothing answers).

        `sole_writer`: this client is the only writer of the engine and never writes the
        same id from two threads at once (the embedded engine, whose file lock admits one
        gateway, behind the catalog's single writer). Then `upsert` inserts the ids that
        are not stored yet: Milvus Lite 2.5.1 takes ~0.25 s per upsert call against
        ~0.04 s per insert (100k rows, checked), and a Milvus insert never checks ids, so
        only a sole writer may skip the upsert.
        """
        self.index = index
        self._sole_writer = sole_writer
        self._timeout_s = timeout_s
        self._uri = uri
        try:
            self._client = MilvusClient(uri, token=token, timeout=timeout_s)
            self._open_registry()
        except MilvusException as exc:
            raise BackendUnavailable(
                f"the catalog engine at {uri} is not reachable: {exc}"
            ) from exc

    # ------------------------------------------------------------------ collections
    def _open_registry(self) -> None:
        client = self._client
        if client.has_collection(_REGISTRY, timeout=self._timeout_s):
            client.load_collection(_REGISTRY, timeout=self._timeout_s)
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("name", DataType.VARCHAR, is_primary=True, max_length=256)
        schema.add_field("model_id", DataType.VARCHAR, max_length=1024)
        schema.add_field("dim", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=_REGISTRY_DIM)
        params = client.prepare_index_params()
        params.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
        client.create_collection(
            _REGISTRY, schema=schema, index_params=params, timeout=self._timeout_s
        )

    def open_collection(self, name: str, *, dim: int, model_id: str) -> None:
        """Create `name` for `model_id`'s vectors, or check that an existing one was made
        for that model (ModelMismatch otherwise: its vectors are of another space)."""
        client = self._client
        rows = client.query(
            _REGISTRY, ids=[name], output_fields=["model_id", "dim"], timeout=self._timeout_s
        )
        if rows:
            stored_id, stored_dim = rows[0]["model_id"], int(rows[0]["dim"])
            if stored_id != model_id or stored_dim != dim:
                raise ModelMismatch(
                    f"catalog collection {name} holds {stored_dim}-d vectors of model "
                    f"{stored_id}, not of {model_id} ({dim}-d); its vectors cannot be searched "
                    "with this model's queries"
                )
        if not client.has_collection(name, timeout=self._timeout_s):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=_ID_BYTES)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            schema.add_field("metadata", DataType.JSON)
            schema.add_field("content_sha256", DataType.VARCHAR, max_length=64)
            params = client.prepare_index_params()
            params.add_index(
                field_name="vector",
                index_type=self.index.index_type,
                metric_type="COSINE",
                params=self.index.build_params(),
            )
            client.create_collection(
                name, schema=schema, index_params=params, timeout=self._timeout_s
            )
            _LOGGER.info("catalog: created %s for %s (%s)", name, model_id, self.index.describe())
        else:
            client.load_collection(name, timeout=self._timeout_s)
        if not rows:
            client.upsert(
                _REGISTRY,
                [{"name": name, "model_id": model_id, "dim": dim, "vector": [0.0] * _REGISTRY_DIM}],
                timeout=self._timeout_s,
            )

    # ------------------------------------------------------------------ items
    def upsert(self, name: str, items: Sequence[StoredItem]) -> None:
        """Add or replace `items` by id (ids unique within `items`)."""
        rows = [
            {
                "id": item.id,
                "vector": np.asarray(item.vector, dtype=np.float32),
                "metadata": dict(item.metadata),
                "content_sha256": item.content_sha256,
            }
            for item in items
        ]
        if not self._sole_writer:
            self._call("upsert", self._client.upsert, name, rows)
            return
        stored = self.get(name, [row["id"] for row in rows])
        new = [row for row in rows if row["id"] not in stored]
        if new:
            self._call("insert", self._client.insert, name, new)
        if len(new) < len(rows):
            replaced = [row for row in rows if row["id"] in stored]
            self._call("upsert", self._client.upsert, name, replaced)

    def get(self, name: str, ids: Sequence[str]) -> dict[str, tuple[dict[str, Any], str]]:
        """Stored ids among `ids` → (metadata, content_sha256)."""
        if not ids:
            return {}
        rows = self._call(
            "get",
            self._client.query,
            name,
            ids=list(ids),
            output_fields=["metadata", "content_sha256"],
        )
        return {row["id"]: (row["metadata"] or {}, row["content_sha256"]) for row in rows}

    def vector(self, name: str, item_id: str) -> np.ndarray | None:
        """The stored vector of `item_id`; None when it is not stored."""
        rows = self._call("get", self._client.query, name, ids=[item_id], output_fields=["vector"])
        return np.asarray(rows[0]["vector"], dtype=np.float32) if rows else None

    def delete(self, name: str, ids: Sequence[str]) -> int:
        """Delete `ids`; how many of them were stored."""
        present = list(self.get(name, ids))
        if present:
            self._call("delete", self._client.delete, name, ids=present)
        return len(present)

    def search(
        self, name: str, vector: np.ndarray, top_k: int, conditions: Mapping[str, Any] | None
    ) -> list[StoreHit]:
        """The `top_k` nearest items by cosine, best first, among those matching."""
        expression = filter_expression(conditions) if conditions else ""
        result = self._call(
            "search",
            self._client.search,
            name,
            data=[np.asarray(vector, dtype=np.float32)],
            limit=top_k,
            filter=expression,
            output_fields=["metadata"],
            search_params=self.index.search_params(top_k),
        )
        return [
            StoreHit(hit["id"], float(hit["distance"]), hit["entity"].get("metadata") or {})
            for hit in result[0]
        ]

    def flush(self, name: str) -> None:
        """Seal what was written so the index covers it (until then the engine scans the
        unsealed rows exhaustively: exact, and slower as they grow)."""
        self._call("flush", self._client.flush, name)

    def count(self, name: str) -> int:
        """Items in `name`."""
        rows = self._call("count", self._client.query, name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def _call(self, what: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, timeout=self._timeout_s, **kwargs)
        except MilvusException as exc:
            if exc.code == Status.CONNECT_FAILED:
                raise self._unreachable(what, exc) from exc
            raise self._failed(what, exc) from exc
        except grpc.RpcError as exc:
            # pymilvus passes some channel errors through as they are: an engine that
            # stopped answering (hung, or swamped) ends in DEADLINE_EXCEEDED here.
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                _LOGGER.warning("catalog %s: the engine at %s did not answer", what, self._uri)
                raise DeadlineExceeded(
                    f"the catalog engine did not answer within {self._timeout_s:g} s "
                    "(--backend-timeout-s)"
                ) from exc
            if code == grpc.StatusCode.UNAVAILABLE:
                raise self._unreachable(what, exc) from exc
            raise self._failed(what, exc) from exc

    def _unreachable(self, what: str, exc: Exception) -> BackendUnavailable:
        """Down, restarting (the embedded engine is restarted by its supervisor) or
        unreachable: a caller may retry, unlike after a failed call."""
        _LOGGER.warning("catalog %s: the engine at %s is not reachable: %s", what, self._uri, exc)
        return BackendUnavailable(
            "the catalog engine is not reachable (down or restarting); retry shortly"
        )

    def _failed(self, what: str, exc: Exception) -> BackendFailure:
        return BackendFailure(
            f"catalog {what} failed at {self._uri}: {exc}", source="the catalog engine"
        )
