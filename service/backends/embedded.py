"""The encoders run in-process as TorchScript (`model.pt`) on one model thread."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from service.backends.model_thread import ModelThreadBackend, Tower
from service.extras import MissingExtra
from service.metrics import Metrics
from service.model.metadata import ModelMetadata

try:
    import torch
except ImportError as exc:  # the gateway install has no torch: ONNX or Triton repositories
    raise MissingExtra("torchscript", "a TorchScript (model.pt) repository", exc.name) from exc

_LOGGER = logging.getLogger(__name__)


class EmbeddedBackend(ModelThreadBackend):
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
        super().__init__(repository, metadata, metrics=metrics, max_batch_size=max_batch_size)
        self._device = torch.device(device)
        self._torch_threads = torch_threads

    def _load_towers(self) -> dict[str, Tower]:
        if self._torch_threads > 0:
            torch.set_num_threads(self._torch_threads)
        towers = {
            modality: self._tower(self._tower_path(modality, "model.pt", "export the model first"))
            for modality in ("image", "text")
        }
        _LOGGER.info("loaded encoders from %s on %s", self._repository, self._device)
        return towers

    def _tower(self, path: Path) -> Tower:
        module = torch.jit.load(str(path), map_location=self._device).eval()
        device = self._device

        def run(rows: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = module(torch.from_numpy(rows).to(device))
                return out.to("cpu", torch.float32).numpy()

        return run
