"""The encoders run in-process by ONNX Runtime (the onnx flavor) on one model thread.

The same contract as `embedded.py`, for repositories exported with `--flavor onnx`:
`clip_image/1/model.onnx` and `clip_text/1/model.onnx`, CPU execution provider, every
graph optimization on. `clipsvc serve --backend embedded` picks this class by itself when
the repository's `metadata.json` says `flavor: onnx`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from service.backends.model_thread import ModelThreadBackend, Tower
from service.model.onnx_graphs import ONNX_FILE, open_session, run_session

_LOGGER = logging.getLogger(__name__)


class OnnxBackend(ModelThreadBackend):
    """ONNX Runtime sessions of `clip_image`/`clip_text` from a model repository, on one thread."""

    #: Says which runtime answers (GetModelInfo, metric labels); the flag value stays
    #: `embedded`, as the runtime follows from the repository.
    name = "embedded-onnx"

    def _load_towers(self) -> dict[str, Tower]:
        towers: dict[str, Tower] = {}
        for modality, input_name in (
            ("image", self._metadata.image_input),
            ("text", self._metadata.text_input),
        ):
            path = self._tower_path(modality, ONNX_FILE, "export with --flavor onnx first")
            session = open_session(path, intra_op_threads=self._threads)
            towers[modality] = functools.partial(_run, session, input_name)
        _LOGGER.info("opened ONNX Runtime sessions for %s (CPU)", self._repository)
        return towers


def _run(session: Any, input_name: str, rows: np.ndarray) -> np.ndarray:
    return run_session(session, input_name, np.ascontiguousarray(rows))
