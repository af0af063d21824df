"""The encoders run in-process (TorchScript) on one model thread; batching is in front of it."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from service.errors import BackendFailure, BackendUnavailable
from service.metrics import Metrics
from service.model.metadata import ModelMetadata

_LOGGER = logging.getLogger(__name__)


class EmbeddedBackend:
    """TorchScript `clip_image`/`clip_text` from a model repository, on one model thread."""

    name = "embedded"

    def __init__(
        self,
        repository: Path,
        metadata: ModelMetadata,
        *,
        metrics: Metrics,
        device: str,
        max_batch_size: int,
        torch_threads: int,
    ) -> None:
        self._repository = Path(repository)
        self._metadata = metadata
        self._metrics = metrics
        self._device = torch.device(device)
        self._torch_threads = torch_threads
        self.max_batch_size = max_batch_size
        # One thread owns the model: torch already uses every core inside a forward pass.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._modules: dict[str, torch.jit.ScriptModule] = {}

    async def start(self) -> None:
        """Load both modules on the model thread."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        if self._torch_threads > 0:
            torch.set_num_threads(self._torch_threads)
        for modality, model in (
            ("image", self._metadata.image_model),
            ("text", self._metadata.text_model),
        ):
            path = self._repository / model / "1" / "model.pt"
            if not path.is_file():
                raise BackendUnavailable(f"{path} not found; export the model first")
            self._modules[modality] = torch.jit.load(str(path), map_location=self._device).eval()
        _LOGGER.info("loaded encoders from %s on %s", self._repository, self._device)

    def _forward(self, modality: str, rows: np.ndarray) -> np.ndarray:
        module = self._modules[modality]
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                out = module(torch.from_numpy(rows).to(self._device))
                return out.to("cpu", torch.float32).numpy()
        except Exception:
            self._metrics.backend_errors.labels(self.name, modality).inc()
            raise
        finally:
            self._metrics.backend_latency.labels(self.name, modality).observe(
                time.perf_counter() - started
            )

    async def ready(self) -> bool:
        """Both modules loaded."""
        return len(self._modules) == 2

    async def embed_images(
        self, pixels_uint8: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """`uint8 [B,3,S,S]` → `float32 [B,D]` (a forward pass cannot be cut short: no timeout)."""
        return await self._run("image", pixels_uint8)

    async def embed_texts(
        self, token_ids: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """`int64 [B,L]` → `float32 [B,D]`."""
        return await self._run("text", token_ids)

    async def aclose(self) -> None:
        """Stop the model thread and drop the modules."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._modules.clear()

    async def _run(self, modality: str, rows: np.ndarray) -> np.ndarray:
        if not self._modules:
            raise BackendUnavailable("encoders are not loaded yet")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._forward, modality, rows)
        except Exception as exc:
            raise BackendFailure(f"{modality} encoder failed: {exc}") from exc
