"""Fakes the tests inject in place of real parts."""

from __future__ import annotations

from typing import Any

from service.model.metadata import ModelMetadata


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


#: What a metadata.json holds besides the fields that have defaults (the demo model's
#: values): a repository exported before any of the later fields loads from just these.
DEMO_METADATA_FIELDS: dict[str, Any] = {
    "model_name": "clip-demo-shapes",
    "pretrained": "none",
    "weights_sha256": "0" * 64,
    "embedding_dim": 64,
    "image_size": 64,
    "context_length": 77,
    "logit_scale": 100.0,
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
}


def model_metadata(**overrides: Any) -> ModelMetadata:
    """The metadata of a CLIP that was never exported: the demo model's unless overridden."""
    return ModelMetadata(**(DEMO_METADATA_FIELDS | overrides))
