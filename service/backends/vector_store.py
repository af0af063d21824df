"""The catalog's vector store: what the catalog needs of one (`VectorStore`), the rows it
stores and finds, the index settings, and metadata filters. Milvus is `milvus_store.py`
(imported only with `--catalog`: pymilvus brings pandas).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.errors import InvalidInput

#: Longest id, in characters (4 bytes each at most in UTF-8: the VARCHAR's byte bound).
MAX_ID_CHARS = 512
# Metadata keys a filter may name: they are written into the engine's expression.
_FILTER_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_MAX_FILTER_KEYS = 16
_MAX_FILTER_VALUES = 256
_MAX_FILTER_STRING = 256
# Index types Milvus Lite builds (it refuses the others: "local mode only support FLAT
# IVF_FLAT AUTOINDEX"); a Milvus server also builds HNSW.
INDEX_TYPES = ("FLAT", "IVF_FLAT", "AUTOINDEX", "HNSW")


@dataclass(frozen=True)
class IndexSettings:
    """How item collections are indexed and searched (COSINE always)."""

    index_type: str = "FLAT"
    #: IVF_FLAT: lists (clusters) the vectors are split into.
    nlist: int = 1024
    #: IVF_FLAT: lists searched per query (recall against speed).
    nprobe: int = 32
    #: HNSW (server only): graph degree, build and search breadth.
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef: int = 128

    def build_params(self) -> dict[str, Any]:
        """The index's build parameters."""
        if self.index_type == "IVF_FLAT":
            return {"nlist": self.nlist}
        if self.index_type == "HNSW":
            return {"M": self.hnsw_m, "efConstruction": self.hnsw_ef_construction}
        return {}

    def search_params(self, top_k: int) -> dict[str, Any]:
        """Per-query parameters (HNSW's ef must be at least top_k)."""
        if self.index_type == "IVF_FLAT":
            return {"params": {"nprobe": self.nprobe}}
        if self.index_type == "HNSW":
            return {"params": {"ef": max(self.hnsw_ef, top_k)}}
        return {}

    def describe(self) -> str:
        """For logs and the README: type and parameters."""
        params = {**self.build_params(), **self.search_params(0).get("params", {})}
        return f"{self.index_type} {json.dumps(params, sort_keys=True)} COSINE"


@dataclass(frozen=True)
class StoredItem:
    """One row to upsert."""

    id: str
    vector: np.ndarray
    metadata: Mapping[str, Any] = field(default_factory=dict)
    content_sha256: str = ""


@dataclass(frozen=True)
class StoreHit:
    """One search result: cosine similarity and the stored metadata."""

    id: str
    score: float
    metadata: dict[str, Any]


class VectorStore(Protocol):
    """What the catalog needs of a vector database (blocking calls)."""

    index: IndexSettings

    def open_collection(self, name: str, *, dim: int, model_id: str) -> None: ...
    def upsert(self, name: str, items: Sequence[StoredItem]) -> None: ...
    def get(self, name: str, ids: Sequence[str]) -> dict[str, tuple[dict[str, Any], str]]: ...
    def vector(self, name: str, item_id: str) -> np.ndarray | None: ...
    def delete(self, name: str, ids: Sequence[str]) -> int: ...
    def search(
        self, name: str, vector: np.ndarray, top_k: int, conditions: Mapping[str, Any] | None
    ) -> list[StoreHit]: ...
    def flush(self, name: str) -> None: ...

    def count(self, name: str) -> int: ...
    def close(self) -> None: ...


def filter_expression(conditions: Mapping[str, Any]) -> str:
    """`{"color": "red", "size": ["S", "M"]}` → `metadata["color"] == "red" and
    metadata["size"] in ["S", "M"]`; InvalidInput for what cannot be written safely.

    Values are written as literals: Milvus Lite 2.5.1 fails on expression templates
    (`filter_params`: "Unexpected error in RPC handling", checked), so keys are limited
    to identifiers and strings to characters that need no escaping in the expression.
    """
    if len(conditions) > _MAX_FILTER_KEYS:
        raise InvalidInput(
            f"{len(conditions)} filter keys, over the limit of {_MAX_FILTER_KEYS}", field="filter"
        )
    clauses = []
    for key, value in conditions.items():
        if not isinstance(key, str) or not _FILTER_KEY.match(key):
            raise InvalidInput(
                f"filter key {str(key)[:64]!r}: use letters, digits and '_' (up to 64, not "
                "starting with a digit)",
                field="filter",
            )
        if isinstance(value, list):
            if not value or len(value) > _MAX_FILTER_VALUES:
                raise InvalidInput(
                    f"filter key {key!r}: a list needs 1 to {_MAX_FILTER_VALUES} values",
                    field="filter",
                )
            literals = ", ".join(_literal(key, v) for v in value)
            clauses.append(f'metadata["{key}"] in [{literals}]')
        else:
            clauses.append(f'metadata["{key}"] == {_literal(key, value)}')
    return " and ".join(clauses)


def _literal(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        if (
            len(value) > _MAX_FILTER_STRING
            or any(c in value for c in '"\\')
            or any(ord(c) < 32 for c in value)
        ):
            raise InvalidInput(
                f"filter key {key!r}: strings are matched up to {_MAX_FILTER_STRING} "
                "characters, without quotes, backslashes or control characters",
                field="filter",
            )
        return f'"{value}"'
    raise InvalidInput(
        f"filter key {key!r}: values are strings, numbers, booleans or lists of them "
        f"(got {type(value).__name__})",
        field="filter",
    )
