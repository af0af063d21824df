"""The encoders run in-process by ONNX Runtime (the onnx flavor) on one model thread.

The same contract as `embedded.py`, for repositories exported with `--flavor onnx`:
`clip_image/1/model.onnx` and `clip_text/1/model.onnx`, CPU execution provider, every
graph optimization on. `clipsvc serve --backend embedded` picks this class by itself when
the repository's `metadata.json` says `flavor: onnx`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import BackendFailure, BackendUnavailable
from service.metrics import Metrics
from service.model.metadata import ModelMetadata
from service.model.onnx_graphs import ONNX_FILE, open_session, run_session

_LOGGER = logging.getLogger(__name__)


class OnnxBackend:
    """ONNX Runtime sessions of `clip_image`/`clip_text` from a model repository, on one thread."""

    #: Says which runtime answers (GetModelInfo, metric labels); the flag value stays
    #: `embedded`, as the runtime follows from the repository.
    name = "embedded-onnx"

    def __init__(
        self,
        repository: Path,
        metadata: ModelMetadata,
        *,
        metrics: Metrics,
        max_batch_size: int,
        intra_op_threads: int,
    ) -> None:
        self._repository = Path(repository)
        self._metadata = metadata
        self._metrics = metrics
        self._intra_op_threads = intra_op_threads
        self.max_batch_size = max_batch_size
        # One thread calls run(): ONNX Runtime already uses its intra-op threads inside it,
        # and a second concurrent run would only split the same cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._sessions: dict[str, tuple[Any, str]] = {}

    async def start(self) -> None:
        """Open both sessions on the model thread."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        for modality, model, input_name in (
            ("image", self._metadata.image_model, self._metadata.image_input),
            ("text", self._metadata.text_model, self._metadata.text_input),
        ):
            path = self._repository / model / "1" / ONNX_FILE
            if not path.is_file():
                raise BackendUnavailable(f"{path} not found; export with --flavor onnx first")
            session = open_session(path, intra_op_threads=self._intra_op_threads)
            self._sessions[modality] = (session, input_name)
        _LOGGER.info("opened ONNX Runtime sessions for %s (CPU)", self._repository)

    def _forward(self, modality: str, rows: np.ndarray) -> np.ndarray:
        session, input_name = self._sessions[modality]
        started = time.perf_counter()
        try:
            return run_session(session, input_name, np.ascontiguousarray(rows))
        except Exception:
            self._metrics.backend_errors.labels(self.name, modality).inc()
            raise
        finally:
            self._metrics.backend_latency.labels(self.name, modality).observe(
                time.perf_counter() - started
            )

    async def ready(self) -> bool:
        """Both sessions open."""
        return len(self._sessions) == 2

    async def embed_images(
        self, pixels_uint8: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """`uint8 [B,3,S,S]` → `float32 [B,D]` (a run cannot be cut short: no timeout)."""
        return await self._run("image", pixels_uint8)

    async def embed_texts(
        self, token_ids: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """`int64 [B,L]` → `float32 [B,D]`."""
        return await self._run("text", token_ids)

    async def aclose(self) -> None:
        """Stop the model thread and drop the sessions."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._sessions.clear()

    async def _run(self, modality: str, rows: np.ndarray) -> np.ndarray:
        if not self._sessions:
            raise BackendUnavailable("encoders are not loaded yet")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._forward, modality, rows)
        except Exception as exc:
            raise BackendFailure(f"{modality} encoder failed: {exc}") from exc
