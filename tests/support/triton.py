"""A real `tritonserver` on free loopback ports, for tests (a helper, not a test file).

    repository = export_demo_repository(tmp / "repo")          # random-weight demo CLIP
    with start_triton(repository, workdir=tmp / "triton") as triton:
        backend = TritonBackend(url=triton.grpc_url, default_timeout_s=10, max_batch_size=32)
        ...
        triton.kill()             # a crash: the whole process group, at once
        triton.start()            # same ports again, blocks until ready

A session-scoped fixture in another test module:

    @pytest.fixture(scope="session")
    def triton(tmp_path_factory):
        require_triton()
        repository = export_demo_repository(tmp_path_factory.mktemp("triton_repo"))
        with start_triton(repository, workdir=tmp_path_factory.mktemp("triton")) as server:
            yield server

Triton blocks while starting (3-10 s): from async code call `start`/`restart` through
`asyncio.to_thread`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from service.model.metadata import (
    IMAGE_INPUT,
    IMAGE_MODEL,
    OUTPUT,
    TEXT_INPUT,
    TEXT_MODEL,
    ModelMetadata,
)
from service.model.triton_config import TensorSpec, render_config
from service.processes.triton_server import TritonError, TritonInstallation, TritonProcess
from service.settings import BatchingOptions

DEMO_MODEL = "clip-demo-shapes"


def require_triton() -> None:
    """Fail loudly when the pip `tritonserver` (nvidia-pytriton) is missing: never skip."""
    try:
        TritonInstallation.find()
    except TritonError as exc:
        pytest.fail(f"tritonserver not available ({exc}); `make install` brings it")


def export_demo_repository(
    out_dir: Path,
    *,
    batching: BatchingOptions | None = None,
    pretrained: str = "none",
) -> ModelMetadata:
    """Export the demo CLIP (random weights unless `pretrained`) for the pip Triton."""
    from service.model.export import export_model

    summary = export_model(
        DEMO_MODEL,
        pretrained,
        Path(out_dir),
        flavor="python",
        # One torch thread per model: the two encoders share two cores with the tests.
        batching=batching or BatchingOptions(torch_threads=1),
        progress=False,
    )
    return summary.metadata


def add_model_variant(
    repository: Path,
    *,
    source: str,
    name: str,
    batching: BatchingOptions,
) -> Path:
    """Copy model `source` of an exported repository as `name` with other batching options.

    Lets one server hold, say, a `clip_image` with a queue of one beside the normal
    one, instead of starting a second server.
    """
    repository = Path(repository)
    metadata = ModelMetadata.load(repository)
    if source == IMAGE_MODEL:
        size = metadata.image_size
        input_spec = TensorSpec(IMAGE_INPUT, "TYPE_UINT8", (3, size, size))
    elif source == TEXT_MODEL:
        input_spec = TensorSpec(TEXT_INPUT, "TYPE_INT64", (-1,))
    else:
        raise ValueError(f"unknown source model {source!r}")
    target = repository / name
    shutil.copytree(repository / source / "1", target / "1", dirs_exist_ok=True)
    config = render_config(
        name=name,
        flavor="python",
        inputs=[input_spec],
        outputs=[TensorSpec(OUTPUT, "TYPE_FP32", (metadata.embedding_dim,))],
        batching=batching,
    )
    (target / "config.pbtxt").write_text(config)
    return target


@contextmanager
def start_triton(
    repository: Path,
    *,
    workdir: Path | None = None,
    grpc_port: int = 0,
    startup_timeout_s: float = 120.0,
    **options: Any,
) -> Iterator[TritonProcess]:
    """A ready `TritonProcess` on `repository`; stopped (whole group) on leaving the block."""
    require_triton()
    triton = TritonProcess(
        repository,
        workdir=workdir,
        grpc_port=grpc_port,
        startup_timeout_s=startup_timeout_s,
        **options,
    )
    try:
        triton.start()
        yield triton
    finally:
        triton.close()


async def inference_statistics(url: str, model: str) -> dict[str, int]:
    """`inference_count`, `execution_count` and success count of one model, so far."""
    import tritonclient.grpc.aio as triton_aio

    async with triton_aio.InferenceServerClient(url) as client:
        answer = await client.get_inference_statistics(model, as_json=True, client_timeout=10)
    stats = answer["model_stats"][0]
    return {
        "inference_count": int(stats.get("inference_count", 0)),
        "execution_count": int(stats.get("execution_count", 0)),
        "success_count": int(stats["inference_stats"].get("success", {}).get("count", 0)),
    }
