"""Any backend behind the gateway's batching queue: single-item calls become batches.

The embedded backend needs it to batch at all. In front of Triton it also pays: the
queue knows which admitted items are still being decoded and holds the batch for
them, which Triton's dynamic batcher cannot see (see `service.core.batching`).
This is also the one place where a call's rows are cut to the batch limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
from opentelemetry import trace

from service.backends.base import CALL_PRIORITY, Backend, split_rows
from service.core import lanes
from service.core.batching import DEFAULT_BULK_MAX_WAIT_S, BatchQueue
from service.errors import BackendFailure, ClipError, DeadlineExceeded
from service.metrics import Metrics
from service.telemetry import NO_TRACER


class BatchedBackend:
    """Implements `Backend` by queueing calls and running them on `inner` in batches."""

    def __init__(
        self,
        inner: Backend,
        *,
        metrics: Metrics,
        max_batch_size: int,
        max_wait_s: float,
        max_inflight: int,
        admitted: Callable[[lanes.Lane], int] | None = None,
        trim_text: bool = True,
        bulk_max_wait_s: float = DEFAULT_BULK_MAX_WAIT_S,
        tracer: trace.Tracer = NO_TRACER,
    ) -> None:
        """`max_batch_size` caps batches further than `inner.max_batch_size` may;
        `admitted(lane)` counts items taken in upstream and not yet answered (see the queue);
        `bulk_max_wait_s`: the age at which bulk work goes before interactive work;
        `trim_text` False: text rows go as padded (the model's padding rule is "full")."""
        self.inner = inner
        self._trim_text = trim_text
        self.name = inner.name
        self._limit = max_batch_size
        self._queue = BatchQueue(
            self._run_batch,
            max_batch_size=lambda: self.max_batch_size,
            max_wait_s=max_wait_s,
            metrics=metrics,
            admitted=admitted,
            max_inflight=max_inflight,
            bulk_max_wait_s=bulk_max_wait_s,
            tracer=tracer,
        )

    @property
    def max_batch_size(self) -> int:
        """The smaller of our cap and the backend's (Triton's is read from its config)."""
        return min(self._limit, self.inner.max_batch_size)

    @property
    def batches_run(self) -> int:
        """Batches the backend answered so far (proves that concurrent calls were merged)."""
        return self._queue.batches_run

    async def start(self) -> None:
        """Start the backend, then the queue."""
        await self.inner.start()
        self._queue.start()

    async def ready(self) -> bool:
        """The backend's own readiness."""
        return await self.inner.ready()

    async def embed_images(
        self, pixels_uint8: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """`uint8 [B,3,S,S]` (any B) → `float32 [B,D]`, batched with concurrent callers."""
        return await self._submit("image", pixels_uint8, timeout_s)

    async def embed_texts(
        self, token_ids: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """`int64 [B,L]` (any B) → `float32 [B,D]`, batched with callers of the same L."""
        return await self._submit("text", token_ids, timeout_s)

    async def aclose(self) -> None:
        """Stop the queue, then the backend."""
        await self._queue.aclose()
        await self.inner.aclose()

    async def _submit(self, modality: str, rows: np.ndarray, timeout_s: float | None) -> np.ndarray:
        chunks = split_rows(rows, self.max_batch_size)
        try:
            outputs = await asyncio.wait_for(
                asyncio.gather(*(self._queue.submit(modality, c, timeout_s) for c in chunks)),
                timeout_s,
            )
        except TimeoutError:
            raise DeadlineExceeded(
                f"{modality} embedding did not finish within {timeout_s:.3f}s"
            ) from None
        except (ClipError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise BackendFailure(
                f"{modality} encoder failed: {exc}", source=f"the {modality} encoder"
            ) from exc
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    async def _run_batch(
        self, modality: str, rows: np.ndarray, timeout_s: float | None
    ) -> np.ndarray:
        # The queue runs each batch in its lane; the backend gets it as a priority level.
        token = CALL_PRIORITY.set(lanes.TRITON_PRIORITY[lanes.current()])
        try:
            return await self._run_inner(modality, rows, timeout_s)
        finally:
            CALL_PRIORITY.reset(token)

    async def _run_inner(
        self, modality: str, rows: np.ndarray, timeout_s: float | None
    ) -> np.ndarray:
        if modality == "image":
            return await self.inner.embed_images(rows, timeout_s=timeout_s)
        # The rows share a bucket length; cut the columns after the batch's last
        # end-of-text (the highest id in each row): exact for a causal tower, less work.
        # Not for towers padded to the full context (SigLIP, HF, ...): they need every column.
        if self._trim_text:
            rows = rows[:, : int(rows.argmax(axis=1).max()) + 1]
        return await self.inner.embed_texts(rows, timeout_s=timeout_s)
