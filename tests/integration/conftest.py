"""Session fixtures of the integration tests: exported models (demo, random ViT-B-32), photos."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import torch
from PIL import Image

from service.processes.gateway import gateway_settings, running_gateway
from service.processes.redis_server import RedisServer
from service.server.app import Gateway
from tests.support.images import real_photos
from tests.support.models import ExportedModel, export_and_load
from tests.support.paths import DEMO_WEIGHTS
from tests.support.triton import ModelControl


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """The trained demo CLIP, exported (python flavor) into a temporary repository."""
    assert DEMO_WEIGHTS.is_file(), f"{DEMO_WEIGHTS} missing: the demo weights are committed"
    return export_and_load("clip-demo-shapes", DEMO_WEIGHTS, tmp_path_factory.mktemp("demo_repo"))


@pytest.fixture(scope="session")
def vit_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExportedModel]:
    """A random-weight ViT-B-32 (the production architecture), exported from a checkpoint."""
    from service.model.export import load_open_clip

    torch.manual_seed(1234)
    clip, _ = load_open_clip("ViT-B-32", "none")
    directory = tmp_path_factory.mktemp("vit")
    checkpoint = directory / "vit-b-32-random.pt"
    torch.save(clip.state_dict(), checkpoint)
    exported = export_and_load("ViT-B-32", checkpoint, directory / "repo")
    yield exported
    checkpoint.unlink(missing_ok=True)


@pytest.fixture(scope="module")
async def gateway(demo_model: ExportedModel) -> AsyncIterator[Gateway]:
    """A gateway with default settings over the demo model, in process, one per module
    (a module that needs other settings defines its own `gateway`)."""
    async with running_gateway(gateway_settings(demo_model.repository)) as gw:
        yield gw


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server, one per module that asks (a test that crashes or pauses its
    server, or needs one of its own, starts its own)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real photos that ship inside scikit-image and scikit-learn."""
    return real_photos()


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> ModelControl:
    """Steers a module's controlled Triton model copies (one per module)."""
    return ModelControl(tmp_path_factory.mktemp("control"))


@pytest.fixture
def control_reset(control: ModelControl) -> Iterator[None]:
    """The gate open and no failure set, before and after the test (modules that hold
    executions at a gate use it for every test: `pytest.mark.usefixtures`)."""
    control.reset()
    yield
    control.reset()
