"""Exported models for tests: an open_clip model in memory beside its exported repository."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ExportedModel:
    """An open_clip model in memory and the repository exported from the same weights."""

    name: str
    clip: torch.nn.Module
    repository: Path


def export_and_load(
    name: str, checkpoint: Path, out: Path, flavor: str = "python"
) -> ExportedModel:
    """Export `checkpoint` into `out` and load the same weights with open_clip."""
    from service.model.export import export_model, load_open_clip

    export_model(name, str(checkpoint), out, flavor=flavor, progress=False)
    clip, _ = load_open_clip(name, str(checkpoint))
    return ExportedModel(name, clip, out)
