"""In-process encoders on one model thread: what the TorchScript and ONNX backends share.

Contract: `start()` loads both towers on the model thread; `embed_*` run one forward
pass there at a time (a runtime already uses every core inside one pass, and a second
concurrent pass would only split them); `ready()` is True once both are loaded. A forward
pass cannot be cut short, so the timeout is not used (the batching queue in front
enforces callers' deadlines). Subclasses say only how a tower is loaded and run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.errors import BackendFailure, BackendUnavailable
from service.metrics import Metrics
from service.model.metadata import ModelMetadata

#: One loaded tower: rows in (uint8 pixels or int64 token ids) → float32 `[B,D]` out.
Tower = Callable[[np.ndarray], np.ndarray]


class ModelThreadBackend:
    """The `Backend` protocol around two towers that a subclass loads in `_load_towers`."""

    name = "in-process"

    def __init__(
        self,
        repository: Path,
        metadata: ModelMetadata,
        *,
        metrics: Metrics,
        max_batch_size: int,
        threads: int,
    ) -> None:
        """`threads`: the runtime's threads inside one forward pass (0: its default)."""
        self._repository = Path(repository)
        self._metadata = metadata
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self._threads = threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._towers: dict[str, Tower] = {}

    def _load_towers(self) -> dict[str, Tower]:
        """{"image": tower, "text": tower}, loaded on the model thread."""
        raise NotImplementedError

    def _tower_path(self, modality: str, file_name: str, hint: str) -> Path:
        """`<repository>/<model>/1/<file_name>`; BackendUnavailable when it is missing."""
        model = self._metadata.image_model if modality == "image" else self._metadata.text_model
        path = self._repository / model / "1" / file_name
        if not path.is_file():
            raise BackendUnavailable(f"{path} not found; {hint}")
        return path

    async def start(self) -> None:
        """Load both towers on the model thread."""
        loop = asyncio.get_running_loop()
        self._towers = await loop.run_in_executor(self._executor, self._load_towers)

    async def ready(self) -> bool:
        """Both towers loaded."""
        return len(self._towers) == 2

    async def embed_images(
        self, pixels_uint8: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """`uint8 [B,3,S,S]` → `float32 [B,D]`."""
        return await self._run("image", pixels_uint8)

    async def embed_texts(
        self, token_ids: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """`int64 [B,L]` → `float32 [B,D]`."""
        return await self._run("text", token_ids)

    async def aclose(self) -> None:
        """Stop the model thread and drop the towers."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._towers.clear()

    async def _run(self, modality: str, rows: np.ndarray) -> np.ndarray:
        if not self._towers:
            raise BackendUnavailable("encoders are not loaded yet")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._forward, modality, rows)
        except Exception as exc:
            raise BackendFailure(
                f"{modality} encoder failed: {exc}", source=f"the {modality} encoder"
            ) from exc

    def _forward(self, modality: str, rows: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self._towers[modality](rows)
        except Exception:
            self._metrics.backend_errors.labels(self.name, modality).inc()
            raise
        finally:
            self._metrics.backend_latency.labels(self.name, modality).observe(
                time.perf_counter() - started
            )
