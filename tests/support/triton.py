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

A model variant with a `ModelControl` lets a test hold Triton's executions at a gate or
make them raise, so that "a request is waiting in Triton's queue" or "the model
failed" are states the test sets up, not races it hopes to win:

    control = ModelControl(tmp / "control")
    add_model_variant(repo, source=IMAGE_MODEL, name="ctl", batching=..., control=control)
    control.hold()                            # executions wait at the gate from now on
    call = asyncio.create_task(backend.embed_images(rows))
    await control.wait_held(1)                # one execution is inside the model, waiting
    control.release()
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterator
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
from service.processes.metric_samples import sample, scrape
from service.processes.triton_server import TritonError, TritonInstallation, TritonProcess
from service.settings import BatchingOptions

DEMO_MODEL = "clip-demo-shapes"

#: The marks of a module whose tests hold Triton's executions at a gate: whatever a test
#: did, the next one starts with the gate open and no failure (`control_reset`).
GATED_MODULE_MARKS = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.usefixtures("control_reset"),
]
#: The controlled copies `add_controlled_models` adds: the image and text models with a
#: queue of 256, and an image model with no batching and room for one waiting request.
GATED_IMAGE_MODEL = "clip_image_gated"
GATED_TEXT_MODEL = "clip_text_gated"
TINY_QUEUE_MODEL = "clip_image_tiny_queue"
# Far past any deadline a test passes: a request Triton drops from a copy's queue was
# dropped by the deadline it carried, not by this default.
CONFIG_QUEUE_TIMEOUT_US = 600_000_000


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


# Appended to a copy of the export's model.py: the same encoder, steered by files in a
# folder (the python stub runs in Triton's process group, so files are the simplest
# channel between a test and an execution in progress).
_CONTROLLED_MODEL = """

# ---------------------------------------------------------------- test control
# Added by tests/support/triton.py (ModelControl): files in CONTROL_DIR steer execute().
import os as _os
import time as _time
import uuid as _uuid

_Encoder = TritonPythonModel
_MOST_HELD_S = 300.0  # a test that died holding the gate must not hold Triton forever


class TritonPythonModel(_Encoder):
    def initialize(self, args):
        super().initialize(args)
        params = json.loads(args["model_config"]).get("parameters", {})
        self.control_dir = Path(params["CONTROL_DIR"]["string_value"])

    def execute(self, requests):
        hold = self.control_dir / "hold"
        if hold.exists():
            marker = self.control_dir / f"held-{_uuid.uuid4().hex}"
            marker.write_text(str(len(requests)))
            given_up = _time.monotonic() + _MOST_HELD_S
            try:
                while hold.exists() and _time.monotonic() < given_up:
                    _time.sleep(0.005)
            finally:
                marker.unlink()
        if (self.control_dir / "fail").exists():
            raise RuntimeError("injected failure: the test asked this model to fail")
        return super().execute(requests)
"""


class ModelControl:
    """Steers a controlled model variant through files in `directory`.

    `hold()` makes every execution that starts from then on wait inside `execute()`
    until `release()`; `fail(True)` makes executions raise (Triton answers every
    request of that execution with an error). Each held execution leaves a `held-*`
    file (its content: how many requests it carries) until it goes on.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)

    def hold(self) -> None:
        """Executions that start from now on wait at the gate."""
        (self.directory / "hold").touch()

    def release(self) -> None:
        """Open the gate: waiting executions go on (at once; they poll every 5 ms)."""
        (self.directory / "hold").unlink(missing_ok=True)

    def fail(self, on: bool = True) -> None:
        """Make executions raise (`on`), or run normally again."""
        path = self.directory / "fail"
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def held(self) -> list[int]:
        """Request counts of the executions waiting at the gate now."""
        counts = []
        for marker in self.directory.glob("held-*"):
            try:
                counts.append(int(marker.read_text() or 0))
            except (FileNotFoundError, ValueError):
                continue  # released meanwhile, or not written out yet
        return counts

    async def wait_held(self, executions: int = 1, timeout_s: float = 120.0) -> None:
        """Until `executions` executions wait at the gate (polled; the bound only
        catches a broken test, a slow machine gets there long before it)."""
        await wait_for(lambda: len(self.held()) >= executions, timeout_s, "executions held")

    def reset(self) -> None:
        """No hold, no failure."""
        self.release()
        self.fail(False)


async def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` every 10 ms until it holds; fail after `timeout_s` (generous:
    it only ends a test that is broken)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.01)


def add_model_variant(
    repository: Path,
    *,
    source: str,
    name: str,
    batching: BatchingOptions,
    control: ModelControl | None = None,
) -> Path:
    """Copy model `source` of an exported repository as `name` with other batching options.

    Lets one server hold, say, a `clip_image` with a queue of one beside the normal
    one, instead of starting a second server. The copy carries the export's identity
    stamp (a gateway may serve it); with `control`, its model.py obeys that
    `ModelControl`.
    """
    repository = Path(repository)
    metadata = ModelMetadata.load(repository)
    if source == IMAGE_MODEL:
        size = metadata.image_size
        input_spec = TensorSpec(IMAGE_INPUT, "TYPE_UINT8", (3, size, size))
    elif source == TEXT_MODEL:
        input_spec = TensorSpec(TEXT_INPUT, "TYPE_INT64", (-1,), ragged=True)
    else:
        raise ValueError(f"unknown source model {source!r}")
    target = repository / name
    shutil.copytree(repository / source / "1", target / "1", dirs_exist_ok=True)
    parameters = metadata.triton_parameters()
    if control is not None:
        model_py = target / "1" / "model.py"
        model_py.write_text(model_py.read_text() + _CONTROLLED_MODEL)
        parameters["CONTROL_DIR"] = str(control.directory)
    config = render_config(
        name=name,
        flavor="python",
        inputs=[input_spec],
        outputs=[TensorSpec(OUTPUT, "TYPE_FP32", (metadata.embedding_dim,))],
        batching=batching,
        parameters=parameters,
    )
    (target / "config.pbtxt").write_text(config)
    return target


def add_controlled_models(repository: Path, control: ModelControl) -> None:
    """Add the controlled copies (`GATED_IMAGE_MODEL`, `GATED_TEXT_MODEL`,
    `TINY_QUEUE_MODEL`) of an exported repository's models, all obeying `control`."""
    gated = BatchingOptions(queue_timeout_us=CONFIG_QUEUE_TIMEOUT_US, torch_threads=1)
    for source, name in ((IMAGE_MODEL, GATED_IMAGE_MODEL), (TEXT_MODEL, GATED_TEXT_MODEL)):
        add_model_variant(repository, source=source, name=name, batching=gated, control=control)
    tiny = BatchingOptions(
        max_batch_size=1,
        max_queue_delay_us=0,
        max_queue_size=1,
        queue_timeout_us=CONFIG_QUEUE_TIMEOUT_US,
        torch_threads=1,
    )
    add_model_variant(
        repository, source=IMAGE_MODEL, name=TINY_QUEUE_MODEL, batching=tiny, control=control
    )


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
    """Counts of one model so far: `inference_count` (rows), `execution_count`, and
    requests that succeeded (`success_count`) or failed (`fail_count`)."""
    import tritonclient.grpc.aio as triton_aio

    async with triton_aio.InferenceServerClient(url) as client:
        answer = await client.get_inference_statistics(model, as_json=True, client_timeout=10)
    stats = answer["model_stats"][0]
    inference = stats["inference_stats"]
    return {
        "inference_count": int(stats.get("inference_count", 0)),
        "execution_count": int(stats.get("execution_count", 0)),
        "success_count": int(inference.get("success", {}).get("count", 0)),
        "fail_count": int(inference.get("fail", {}).get("count", 0)),
    }


async def shared_memory_regions(url: str) -> dict[str, dict[str, Any]]:
    """The system shared-memory regions gateways registered with the Triton at `url`
    (named `clip_...`), by name: each `{"name", "key", "offset", "byte_size"}`."""
    import tritonclient.grpc.aio as triton_aio

    async with triton_aio.InferenceServerClient(url) as client:
        status = await client.get_system_shared_memory_status(as_json=True, client_timeout=10)
    regions = status.get("regions", {}).values()
    return {r["name"]: r for r in regions if r["name"].startswith("clip_")}


async def pending_requests(triton: TritonProcess, model: str, version: str = "1") -> int:
    """Requests of `model` waiting in Triton's queue now (`nv_inference_pending_request_count`
    on Triton's /metrics page; an execution in progress is not counted)."""
    samples = await asyncio.to_thread(scrape, triton.ports.metrics)
    name = "nv_inference_pending_request_count"
    return int(sample(samples, name, model=model, version=version))


async def wait_pending(
    triton: TritonProcess,
    model: str,
    count: int,
    timeout_s: float = 120.0,
    *,
    call: asyncio.Future[Any] | None = None,
) -> None:
    """Until exactly `count` requests of `model` wait in Triton's queue (polled; the
    bound only ends a broken test). `call`: the request expected to join the queue; if it
    ends first, it never got there in time (e.g. its deadline passed on the way), and the
    failure says so instead of waiting out `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (pending := await pending_requests(triton, model)) != count:
        if call is not None and call.done():
            outcome = call.exception() if not call.cancelled() else "cancelled"
            raise AssertionError(
                f"{model}: the call ended ({outcome!r}) before {count} requests were queued"
                f" in Triton ({pending} are): it never reached Triton's queue in time"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{model}: {pending} requests queued in Triton, not {count}")
        await asyncio.sleep(0.02)


async def statistics_once(
    url: str, model: str, before: dict[str, int], timeout_s: float = 60.0, **at_least: int
) -> dict[str, int]:
    """The counts of `model` since `before`, polled until each count named in
    `at_least` (`inference_count=64`, `success_count=2`) has reached its value.

    Triton updates its statistics just after it answers, so a test that has its
    answers may still read the old counts for a moment. The bound only ends a
    broken test; on a slow machine the counts arrive long before it.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        now = await inference_statistics(url, model)
        counts = {key: now[key] - before.get(key, 0) for key in now}
        if all(counts[key] >= value for key, value in at_least.items()):
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"{model}: statistics since the start are {counts}")
        await asyncio.sleep(0.02)
