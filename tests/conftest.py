"""Shared fixtures: exported models (demo and random-weight ViT-B-32) and test photos."""

from __future__ import annotations

import os

# Before torch loads OpenMP, as `clipsvc` does: in-process gateways share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_WEIGHTS = REPO_ROOT / "demo" / "clip-demo-shapes.pt"


@dataclass(frozen=True)
class ExportedModel:
    """An open_clip model in memory and the repository exported from the same weights."""

    name: str
    clip: torch.nn.Module
    repository: Path


def _export(name: str, checkpoint: Path, out: Path, flavor: str = "python") -> ExportedModel:
    from service.model.export import export_model, load_open_clip

    export_model(name, str(checkpoint), out, flavor=flavor, progress=False)
    clip, _ = load_open_clip(name, str(checkpoint))
    return ExportedModel(name, clip, out)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """The trained demo CLIP, exported (python flavor) into a temporary repository."""
    assert DEMO_WEIGHTS.is_file(), f"{DEMO_WEIGHTS} missing: the demo weights are committed"
    return _export("clip-demo-shapes", DEMO_WEIGHTS, tmp_path_factory.mktemp("demo_repo"))


@pytest.fixture(scope="session")
def vit_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExportedModel]:
    """A random-weight ViT-B-32 (the production architecture), exported from a checkpoint."""
    from service.model.export import load_open_clip

    torch.manual_seed(1234)
    clip, _ = load_open_clip("ViT-B-32", "none")
    directory = tmp_path_factory.mktemp("vit")
    checkpoint = directory / "vit-b-32-random.pt"
    torch.save(clip.state_dict(), checkpoint)
    exported = _export("ViT-B-32", checkpoint, directory / "repo")
    yield exported
    checkpoint.unlink(missing_ok=True)


def _photos() -> dict[str, Image.Image]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {
        "astronaut": Image.fromarray(data.astronaut()),
        "chelsea": Image.fromarray(data.chelsea()),
        "coffee": Image.fromarray(data.coffee()),
        "rocket": Image.fromarray(data.rocket()),
        "camera": Image.fromarray(data.camera()),  # grayscale (L)
    }
    sample = load_sample_images()
    for name, array in zip(("china", "flower"), sample.images, strict=True):
        photos[name] = Image.fromarray(array)
    return photos


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real photos that ship inside scikit-image and scikit-learn."""
    return _photos()


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    """Image → encoded bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def random_uint8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Deterministic random pixels."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
