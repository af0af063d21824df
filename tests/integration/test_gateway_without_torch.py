"""The gateway serves without torch: the base install (pyproject's dependencies) is enough.

`clipsvc serve` runs in a child process where torch, open_clip, transformers (and the
Hugging Face hub client the image leaves out) cannot be imported, as in a fresh
`pip install .` (tests/support/blocked_imports.py records every attempt, also caught ones):
with the Triton backend and with the in-process ONNX Runtime backend it serves vectors equal
to open_clip's, drains on SIGTERM and exits 0, and nothing ever asked for those packages.
A TorchScript repository needs torch: the gateway then names the extra to install.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from service.client import AsyncClipClient
from service.model.export import export_model
from service.processes.gateway import GatewayProcess
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.paths import DEMO_WEIGHTS, REPO_ROOT
from tests.support.reference import reference_images, reference_texts
from tests.support.triton import start_triton

pytestmark = pytest.mark.integration

TOL = 1e-5
TEXTS = ["a red circle", "a green hexagon on a black background"]


class TorchFreeGateway(GatewayProcess):
    """`clipsvc serve` under tests.support.blocked_imports, reporting to `report`."""

    def __init__(self, repository: Path, report: Path, **settings: object) -> None:
        super().__init__(repository, **settings)
        self.report = report

    def command(self, ports: Mapping[str, int]) -> list[str]:
        """`python -m tests.support.blocked_imports --report FILE service.cli serve ...`."""
        python, dash_m, *serve = super().command(ports)
        assert dash_m == "-m" and serve[0] == "service.cli"
        return [python, "-m", "tests.support.blocked_imports", "--report", str(self.report), *serve]


@pytest.fixture(scope="module")
def onnx_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo CLIP exported as the onnx flavor (what an embedded gateway image bakes)."""
    out = tmp_path_factory.mktemp("no-torch-onnx") / "repo"
    export_model("clip-demo-shapes", str(DEMO_WEIGHTS), out, flavor="onnx", progress=False)
    return out


async def _serve_and_drain(gateway: TorchFreeGateway, model: ExportedModel) -> dict[str, list]:
    """Vectors equal open_clip's, SIGTERM drains with exit 0; the blocked-import report."""
    images = [encode(photo_like(200, 150, seed=seed), "PNG") for seed in range(2)]
    with gateway:
        async with AsyncClipClient(gateway.target, timeout_s=120) as client:
            texts = await client.embed_text(TEXTS)
            pictures = await client.embed_image(images)
        gateway.send_signal(signal.SIGTERM, group=False)
        assert gateway.wait(60) == 0, gateway.log_tail()
    np.testing.assert_allclose(texts.vectors, reference_texts(model, TEXTS), atol=TOL)
    np.testing.assert_allclose(pictures.vectors, reference_images(model, images), atol=TOL)
    return json.loads(gateway.report.read_text())


async def test_triton_backend_serves_without_torch(
    demo_model: ExportedModel, tmp_path: Path
) -> None:
    with start_triton(demo_model.repository, workdir=tmp_path / "triton") as triton:
        gateway = TorchFreeGateway(
            demo_model.repository,
            tmp_path / "report.json",
            backend="triton",
            triton_url=triton.grpc_url,
        )
        report = await _serve_and_drain(gateway, demo_model)
    assert report == {"attempts": [], "loaded": []}


async def test_embedded_onnx_backend_serves_without_torch(
    onnx_repository: Path, demo_model: ExportedModel, tmp_path: Path
) -> None:
    gateway = TorchFreeGateway(onnx_repository, tmp_path / "report.json", backend="embedded")
    report = await _serve_and_drain(gateway, demo_model)
    assert report == {"attempts": [], "loaded": []}


def test_a_torchscript_repository_names_the_extra_it_needs(demo_model: ExportedModel) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.blocked_imports", "service.cli", "serve",
         "--model-repository", str(demo_model.repository), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--http-port", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "pip install 'clip-service[torchscript]'" in done.stderr, done.stderr[-3000:]
