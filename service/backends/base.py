"""The small interface every backend implements."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol

import numpy as np
from opentelemetry import propagate

#: Priority level of the backend call running in this context: Triton's request priority
#: (1 is served first; 0 = the model's default level). The gateway's batching queue sets
#: it from the batch's lane (`service.core.lanes`); backends without priorities ignore it.
CALL_PRIORITY: ContextVar[int] = ContextVar("clip_call_priority", default=0)


def trace_headers() -> dict[str, str] | None:
    """The running span's W3C `traceparent` (and `tracestate`) for a backend request;
    None when no span records (tracing off): the request goes as before."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


class Backend(Protocol):
    """Runs the two exported encoders on already-prepared tensors.

    Errors are `service.errors` types: BackendUnavailable (not reachable / not ready),
    Overloaded (its queue is full), DeadlineExceeded, BackendFailure (anything else).
    """

    #: "embedded" or "triton"; used in metrics labels and GetModelInfo.
    name: str
    #: Most items one `embed_*` call may carry.
    max_batch_size: int

    async def start(self) -> None:
        """Connect / load; may be called before the backend is reachable."""

    async def ready(self) -> bool:
        """True when an inference would succeed now (server up, models loaded)."""

    async def embed_images(
        self, pixels_uint8: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """`uint8 [B,3,S,S]` → L2-normalized `float32 [B,D]`."""

    async def embed_texts(
        self, token_ids: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """`int64 [B,L]` (L ≤ context length, end-of-text inside) → `float32 [B,D]`."""

    async def aclose(self) -> None:
        """Release connections, threads and models."""


def split_rows(rows: np.ndarray, step: int) -> list[np.ndarray]:
    """`rows` cut into consecutive pieces of at most `step` rows (one piece when it fits)."""
    if step < 1:
        raise ValueError(f"step must be at least 1, not {step}")
    if len(rows) <= step:
        return [rows]
    return [rows[start : start + step] for start in range(0, len(rows), step)]
