"""The encoders run in-process as TorchScript (`model.pt`) on one model thread."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from service.backends.model_thread import ModelThreadBackend, Tower
from service.extras import MissingExtra

try:
    import torch
except ImportError as exc:  # the gateway install has no torch: ONNX or Triton repositories
    raise MissingExtra("torchscript", "a TorchScript (model.pt) repository", exc.name) from exc

_LOGGER = logging.getLogger(__name__)


class EmbeddedBackend(ModelThreadBackend):
    """TorchScript `clip_image`/`clip_text` from a model repository, on one model thread."""

    name = "embedded"

    def __init__(self, *args: Any, device: str, **kwargs: Any) -> None:
        """`device`: where the towers run (`cpu`, `cuda`, `cuda:1`); the rest as
        `ModelThreadBackend`'s."""
        super().__init__(*args, **kwargs)
        self._device = torch.device(device)

    def _load_towers(self) -> dict[str, Tower]:
        if self._threads > 0:
            torch.set_num_threads(self._threads)
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
