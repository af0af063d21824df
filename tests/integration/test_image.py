"""The gateway image, built offline and run for real with podman (or docker).

Built by scripts/build_image.sh, what `make image` runs: the base image, the wheels and the
model come from the host (cached under .cache/image/), nothing in the build reaches the
network. Each image then runs read-only as its own non-root user on the host network
(the gateway bound to 127.0.0.1, free ports), and from the host: health SERVING,
EmbedText and EmbedImage equal to open_clip's vectors within 1e-5, `/v1/embeddings` with
the official openai client, `/metrics`; then SIGTERM drains it and it exits 0.

- `gateway` (backend triton, the production shape): the demo model mounted over the
  image's repository, a real tritonserver on the host serving the same export.
- `gateway` built with BACKEND=embedded: the demo model baked in as ONNX, run in-process by
  ONNX Runtime (the image has no torch).
"""

from __future__ import annotations

import base64
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from service.client import AsyncClipClient
from service.model.export import export_model
from service.processes.metric_samples import sample, scrape
from tests.support.container import (
    GatewayContainer,
    build_gateway_image,
    engine,
    engine_run,
    image_size_bytes,
    readable_copy,
)
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.paths import DEMO_WEIGHTS
from tests.support.reference import reference_images, reference_texts
from tests.support.triton import start_triton

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3600)]

TOL = 1e-5
TEXTS = ["a red circle", "a photo of a blue star on a white background", "x"]
#: The issue's bound on the gateway image (it was several GB with torch).
MAX_IMAGE_BYTES = 400 * 1000 * 1000


@pytest.fixture(scope="module")
def gateway_image(demo_model: ExportedModel) -> str:
    """The gateway image (backend triton) with the demo export's metadata baked in."""
    return build_gateway_image(
        "localhost/clip-service-gateway:test", "triton", demo_model.repository
    )


@pytest.fixture(scope="module")
def embedded_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The embedded variant: the demo model exported as ONNX and baked in."""
    out = tmp_path_factory.mktemp("image-onnx") / "repo"
    export_model("clip-demo-shapes", str(DEMO_WEIGHTS), out, flavor="onnx", progress=False)
    return build_gateway_image("localhost/clip-service-gateway:test-embedded-onnx", "embedded", out)


def _inspect(tag: str, field: str) -> str:
    done = subprocess.run(
        [*engine(), "image", "inspect", "--format", field, tag],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return done.stdout.strip()


async def _check_serving(container: GatewayContainer, model: ExportedModel) -> None:
    """EmbedText / EmbedImage over gRPC equal open_clip; /v1/embeddings; /metrics."""
    images = [encode(photo_like(320, 240, seed=seed), "JPEG") for seed in range(2)]
    async with AsyncClipClient(container.target, timeout_s=120) as client:
        texts = await client.embed_text(TEXTS)
        pictures = await client.embed_image(images)
    np.testing.assert_allclose(texts.vectors, reference_texts(model, TEXTS), atol=TOL)
    np.testing.assert_allclose(pictures.vectors, reference_images(model, images), atol=TOL)

    http = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{container.bound_port('http')}/v1",
        api_key="unused",
        max_retries=0,
    )
    async with http:
        # The list goes through as it is: the client does not look inside `input`.
        inputs: list[Any] = [{"text": TEXTS[0]}, {"image": base64.b64encode(images[0]).decode()}]
        answer = await http.embeddings.create(model="clip", input=inputs)
    served = np.array([item.embedding for item in answer.data], dtype=np.float32)
    np.testing.assert_allclose(served[0], texts.vectors[0], atol=TOL)
    np.testing.assert_allclose(served[1], pictures.vectors[0], atol=TOL)

    metrics = scrape(container.bound_port("metrics"))
    assert sample(metrics, "clip_requests_total", method="EmbedText", code="OK") >= 1
    assert sample(metrics, "clip_requests_total", method="EmbedImage", code="OK") >= 1


async def _serve_then_drain(container: GatewayContainer, model: ExportedModel) -> None:
    with container:
        await _check_serving(container, model)
        # What Kubernetes does: SIGTERM to the container's main process (the engine's
        # client passes it on), which drains and exits on its own.
        container.send_signal(signal.SIGTERM, group=False)
        assert container.wait(60) == 0, container.log_tail()


def test_gateway_image_is_small_non_root_and_has_no_torch(gateway_image: str) -> None:
    size = image_size_bytes(gateway_image)
    assert size <= MAX_IMAGE_BYTES, f"{gateway_image} is {size / 1e6:.0f} MB"
    assert _inspect(gateway_image, "{{.Config.User}}") == "10001:10001"
    probe = subprocess.run(
        [*engine_run(), "--rm", "--network", "none", "--read-only", "--entrypoint", "python",
         gateway_image, "-c",
         "import importlib.util as u; print([m for m in ('torch', 'open_clip', 'transformers')"
         " if u.find_spec(m)])"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert probe.stdout.strip() == "[]"


async def test_gateway_image_serves_through_triton_read_only_then_drains(
    gateway_image: str, demo_model: ExportedModel, tmp_path: Path
) -> None:
    mounted = readable_copy(demo_model.repository, tmp_path / "repo")
    with start_triton(demo_model.repository, workdir=tmp_path / "triton") as triton:
        container = GatewayContainer(
            gateway_image,
            repository=mounted,
            environment={"CLIP_TRITON_URL": triton.grpc_url},
        )
        await _serve_then_drain(container, demo_model)


async def test_embedded_image_serves_its_baked_onnx_model_then_drains(
    embedded_image: str, demo_model: ExportedModel
) -> None:
    await _serve_then_drain(GatewayContainer(embedded_image), demo_model)
