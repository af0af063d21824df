"""The Triton backend against a real `tritonserver` (the pip wheel's, CPU, python backend).

One server per module serves every test; the fault test kills it and starts it again
on the same ports. Beside the two exported models the repository holds copies with
other batching options: limits that differ from every default (5 and 3), and
controlled copies whose executions a test can hold at a gate (`ModelControl`), so
that "requests wait in Triton's queue" is a state the test sets up and checks with
Triton's own pending-request gauge and statistics, never a race against the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch

from service.backends.triton import TritonBackend
from service.errors import (
    BackendFailure,
    BackendUnavailable,
    DeadlineExceeded,
    Overloaded,
)
from service.metrics import Metrics
from service.model.metadata import IMAGE_MODEL, TEXT_MODEL, ModelMetadata
from service.processes.child_server import group_members
from service.processes.metric_samples import sample
from service.processes.triton_server import (
    TritonError,
    TritonProcess,
    server_version,
)
from service.settings import BatchingOptions
from tests.support.paths import REPO_ROOT
from tests.support.triton import (
    GATED_IMAGE_MODEL,
    GATED_MODULE_MARKS,
    GATED_TEXT_MODEL,
    TINY_QUEUE_MODEL,
    ModelControl,
    add_controlled_models,
    add_model_variant,
    export_demo_repository,
    inference_statistics,
    pending_requests,
    require_triton,
    start_triton,
    statistics_once,
    wait_for,
    wait_pending,
)

pytestmark = GATED_MODULE_MARKS

# Batch limits that are no default anywhere (BatchingOptions, Settings, the fixtures'
# constructor arguments): a backend can only know them by reading the configs.
ODD_IMAGE_MODEL, ODD_IMAGE_LIMIT = "clip_image_b5", 5
ODD_TEXT_MODEL, ODD_TEXT_LIMIT = "clip_text_b3", 3
# Bounds that only end a broken test: what they bound takes milliseconds, and a
# loaded 2-core machine is slower by far less than these factors.
PATIENT_S = 120.0
# A failure that must not wait for the deadline: answered in far less than half of it.
FAIL_FAST_DEADLINE_S = 60.0


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, control: ModelControl) -> Path:
    """The demo CLIP (random weights) exported for the pip Triton, plus its copies."""
    require_triton()
    repo = tmp_path_factory.mktemp("triton_repo")
    export_demo_repository(repo)
    for source, name, limit in (
        (IMAGE_MODEL, ODD_IMAGE_MODEL, ODD_IMAGE_LIMIT),
        (TEXT_MODEL, ODD_TEXT_MODEL, ODD_TEXT_LIMIT),
    ):
        add_model_variant(
            repo,
            source=source,
            name=name,
            batching=BatchingOptions(max_batch_size=limit, torch_threads=1),
        )
    add_controlled_models(repo, control)  # one ModelControl for all three
    return repo


@pytest.fixture(scope="module")
def metadata(repository: Path) -> ModelMetadata:
    """What the export recorded (image size, embedding size)."""
    return ModelMetadata.load(repository)


@pytest.fixture(scope="module")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    """One tritonserver for the module."""
    with start_triton(repository, workdir=tmp_path_factory.mktemp("triton")) as server:
        yield server


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    """The registry the module's backend records into."""
    return Metrics()


@contextlib.asynccontextmanager
async def started(triton: TritonProcess, **options: Any) -> AsyncIterator[TritonBackend]:
    """A backend on `triton` built with `options`, started, and closed afterwards."""
    backend = TritonBackend(url=triton.grpc_url, **options)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


@pytest.fixture(scope="module")
async def backend(triton: TritonProcess, metrics: Metrics) -> AsyncIterator[TritonBackend]:
    """A started backend on the module's server (the exported models)."""
    async with started(triton, default_timeout_s=20.0, max_batch_size=7, metrics=metrics) as b:
        yield b


@pytest.fixture(scope="module")
async def odd_backend(triton: TritonProcess) -> AsyncIterator[TritonBackend]:
    """A backend on the copies whose limits are 5 (image) and 3 (text); told 7."""
    models = {"image_model": ODD_IMAGE_MODEL, "text_model": ODD_TEXT_MODEL}
    async with started(triton, default_timeout_s=PATIENT_S, max_batch_size=7, **models) as b:
        yield b


@pytest.fixture(scope="module")
async def gated_backend(triton: TritonProcess) -> AsyncIterator[TritonBackend]:
    """A backend on the controlled copies (queue of 256)."""
    models = {"image_model": GATED_IMAGE_MODEL, "text_model": GATED_TEXT_MODEL}
    async with started(triton, default_timeout_s=PATIENT_S, max_batch_size=32, **models) as b:
        yield b


@pytest.fixture(scope="module")
def image_module(repository: Path) -> torch.jit.ScriptModule:
    """The exported image encoder, loaded in-process."""
    return torch.jit.load(str(repository / IMAGE_MODEL / "1" / "model.pt")).eval()


@pytest.fixture(scope="module")
def text_module(repository: Path) -> torch.jit.ScriptModule:
    """The exported text encoder, loaded in-process."""
    return torch.jit.load(str(repository / TEXT_MODEL / "1" / "model.pt")).eval()


def pixels(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """Random uint8 images `[batch, 3, size, size]`."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)


def token_ids(texts: list[str], length: int) -> np.ndarray:
    """CLIP BPE ids cut to `length` (the end-of-text token stays inside)."""
    tokens = open_clip.tokenize(texts)  # [B, 77], zero padded
    longest = int((tokens != 0).sum(dim=1).max())
    assert longest <= length, "the cut must keep every end-of-text token"
    return tokens[:, :length].numpy().astype(np.int64)


def run_module(module: torch.jit.ScriptModule, rows: np.ndarray) -> np.ndarray:
    """The TorchScript module on `rows`, in this process."""
    with torch.inference_mode():
        return module(torch.from_numpy(rows)).numpy()


# ---------------------------------------------------------------------- tests
async def test_start_reads_the_model_configs(
    backend: TritonBackend,
    odd_backend: TritonBackend,
    triton: TritonProcess,
    metadata: ModelMetadata,
) -> None:
    assert backend.name == "triton"
    assert backend.max_batch_size == 32  # the export's limit, not the 7 it was given
    # The smaller limit of the two configs, which is neither what the backend was given
    # (7) nor any default (32): read from Triton, not kept.
    assert odd_backend.max_batch_size == ODD_TEXT_LIMIT
    assert odd_backend.embedding_dim == metadata.embedding_dim
    assert await odd_backend.ready()
    assert server_version(triton.http_url)


async def test_a_call_over_a_models_limit_is_split_into_requests_within_it(
    odd_backend: TritonBackend,
    triton: TritonProcess,
    metadata: ModelMetadata,
    image_module: torch.jit.ScriptModule,
    text_module: torch.jit.ScriptModule,
) -> None:
    """12 images at a limit of 5 are three requests (5 + 5 + 2), 7 texts at 3 are three
    (3 + 3 + 1): Triton's statistics count the requests it received."""
    images = pixels(12, metadata.image_size, seed=31)
    texts = token_ids([f"text {i}" for i in range(7)], 8)
    cases = [
        (ODD_IMAGE_MODEL, ODD_IMAGE_LIMIT, odd_backend.embed_images, images, image_module),
        (ODD_TEXT_MODEL, ODD_TEXT_LIMIT, odd_backend.embed_texts, texts, text_module),
    ]
    for model, limit, embed, rows, module in cases:
        before = await inference_statistics(triton.grpc_url, model)
        got = await embed(rows)
        expected = len(rows)
        counts = await statistics_once(triton.grpc_url, model, before, inference_count=expected)
        assert counts["inference_count"] == expected
        assert counts["success_count"] == -(-expected // limit), (model, counts)
        np.testing.assert_allclose(got, run_module(module, rows), atol=1e-5, rtol=0)


async def test_images_equal_the_torchscript_module(
    backend: TritonBackend, image_module: torch.jit.ScriptModule, metadata: ModelMetadata
) -> None:
    for batch, seed in ((1, 1), (5, 2), (40, 3)):  # 40 > 32: two requests, in order
        rows = pixels(batch, metadata.image_size, seed)
        got = await backend.embed_images(rows)
        want = run_module(image_module, rows)
        assert got.shape == (batch, metadata.embedding_dim)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


async def test_texts_equal_the_torchscript_module(
    backend: TritonBackend, text_module: torch.jit.ScriptModule, metadata: ModelMetadata
) -> None:
    texts = ["a red circle", "two blue squares on a white background", "x"]
    for length in (77, 32, 12, 9):
        rows = token_ids(texts, length)
        got = await backend.embed_texts(rows)
        want = run_module(text_module, rows)
        assert got.shape == (len(texts), metadata.embedding_dim)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The shortest possible text: start and end token only.
    rows = token_ids([""], 2)
    np.testing.assert_allclose(
        await backend.embed_texts(rows), run_module(text_module, rows), atol=1e-5, rtol=0
    )


async def test_empty_batch_needs_no_call(backend: TritonBackend, metadata: ModelMetadata) -> None:
    out = await backend.embed_images(np.zeros((0, 3, 64, 64), dtype=np.uint8))
    assert out.shape == (0, metadata.embedding_dim)


async def test_concurrent_single_images_are_batched_by_triton(
    gated_backend: TritonBackend,
    triton: TritonProcess,
    control: ModelControl,
    metadata: ModelMetadata,
) -> None:
    """63 single-image requests queued behind a held one run as at most two executions."""
    rows = pixels(64, metadata.image_size, seed=7)
    before = await inference_statistics(triton.grpc_url, GATED_IMAGE_MODEL)
    control.hold()
    first = asyncio.create_task(gated_backend.embed_images(rows[:1]))
    await control.wait_held(1)
    rest = [asyncio.create_task(gated_backend.embed_images(rows[i : i + 1])) for i in range(1, 64)]
    await wait_pending(triton, GATED_IMAGE_MODEL, 63)
    control.release()
    results = await asyncio.gather(first, *rest)
    counts = await statistics_once(triton.grpc_url, GATED_IMAGE_MODEL, before, inference_count=64)
    assert counts["inference_count"] == counts["success_count"] == 64
    # The held one, then 63 queued requests at most 32 (max_batch_size) to an execution.
    assert counts["execution_count"] <= 3, counts
    # Batched rows still come back to their own caller.
    batched = await gated_backend.embed_images(rows)
    np.testing.assert_allclose(np.concatenate(results), batched, atol=1e-5, rtol=0)


async def test_concurrent_texts_of_mixed_lengths_share_executions(
    gated_backend: TritonBackend,
    triton: TritonProcess,
    control: ModelControl,
    text_module: torch.jit.ScriptModule,
) -> None:
    """Ragged batching: the dynamic batcher merges different token lengths (model.py groups)."""
    lengths = [8, 16, 24, 32] * 8
    texts = [f"caption number {i}" for i in range(len(lengths))]
    rows = [token_ids([t], n) for t, n in zip(texts, lengths, strict=True)]
    before = await inference_statistics(triton.grpc_url, GATED_TEXT_MODEL)
    control.hold()
    first = asyncio.create_task(gated_backend.embed_texts(rows[0]))
    await control.wait_held(1)
    rest = [asyncio.create_task(gated_backend.embed_texts(r)) for r in rows[1:]]
    await wait_pending(triton, GATED_TEXT_MODEL, len(rows) - 1)
    control.release()
    results = await asyncio.gather(first, *rest)
    counts = await statistics_once(
        triton.grpc_url, GATED_TEXT_MODEL, before, inference_count=len(rows)
    )
    assert counts["inference_count"] == len(rows)
    # The held one, then all 31 queued at once. Without allow_ragged_batch Triton would
    # merge only equal lengths: four executions at least after the held one.
    assert counts["execution_count"] <= 2, counts
    for got, r in zip(results, rows, strict=True):
        np.testing.assert_allclose(got, run_module(text_module, r), atol=1e-5, rtol=0)


async def test_latency_and_errors_are_recorded(backend: TritonBackend, metrics: Metrics) -> None:
    labels = {"backend": "triton", "modality": "text"}
    calls, errors = "clip_backend_duration_seconds_count", "clip_backend_errors_total"
    before = sample(metrics.registry, calls, **labels)
    await backend.embed_texts(token_ids(["a green star"], 8))
    assert sample(metrics.registry, calls, **labels) == before + 1
    failed = sample(metrics.registry, errors, **labels)
    with pytest.raises(BackendFailure):
        await backend.embed_texts(np.zeros((1, 2, 3), dtype=np.int64))  # wrong rank
    assert sample(metrics.registry, errors, **labels) == failed + 1


async def test_bad_input_is_a_backend_failure_with_tritons_message(
    backend: TritonBackend,
) -> None:
    with pytest.raises(BackendFailure, match="unexpected shape"):
        await backend.embed_images(np.zeros((1, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(BackendFailure, match="uint8"):
        await backend.embed_images(np.zeros((1, 3, 64, 64), dtype=np.float32))


async def test_a_model_that_raises_is_a_backend_failure_and_the_next_call_works(
    gated_backend: TritonBackend, control: ModelControl, metadata: ModelMetadata
) -> None:
    rows = pixels(2, metadata.image_size, seed=17)
    control.fail(True)
    with pytest.raises(BackendFailure, match="injected failure") as err:
        await gated_backend.embed_images(rows)
    assert GATED_IMAGE_MODEL in str(err.value)
    control.fail(False)
    assert (await gated_backend.embed_images(rows)).shape == (2, metadata.embedding_dim)


async def test_a_call_that_gave_up_is_dropped_from_tritons_queue(
    gated_backend: TritonBackend,
    triton: TritonProcess,
    control: ModelControl,
    metadata: ModelMetadata,
) -> None:
    """A call that gives up leaves nothing queued in Triton: the Triton request carries
    the caller's budget (as its gRPC deadline and as Triton's queue timeout), so Triton
    drops it instead of running it later for nobody."""
    before = await inference_statistics(triton.grpc_url, GATED_IMAGE_MODEL)
    control.hold()
    blocker = asyncio.create_task(
        gated_backend.embed_images(pixels(1, metadata.image_size, seed=21))
    )
    await control.wait_held(1)
    # Long enough to reach Triton's queue on a slow loaded machine before it passes; the
    # held execution ahead of it is what makes it miss the deadline, so a longer one
    # costs time, not coverage.
    timeout_s = 10.0
    late = asyncio.create_task(
        gated_backend.embed_images(pixels(1, metadata.image_size, seed=22), timeout_s=timeout_s)
    )
    await wait_pending(triton, GATED_IMAGE_MODEL, 1, call=late)
    queued_by = time.monotonic()  # Triton started its timeout before this
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(late, PATIENT_S)  # the bound only ends a broken test
    # Answered while its work could not have run: by the deadline, not by the work.
    assert control.held() == [1]
    # Triton's deadline for it ends by `queued_by + timeout_s`; wait past that (on a slow
    # machine only further past). A request sent without the caller's budget (with the
    # backend's default of 120 s, or the config's queue timeout of 600 s) stays queued.
    await asyncio.sleep(max(0.0, queued_by + timeout_s - time.monotonic()) + 0.5)
    # Triton 2.43 takes an expired request out of its queue at its timeout (0 left);
    # older servers leave it queued until the next batch is formed, then drop it (1).
    left = await pending_requests(triton, GATED_IMAGE_MODEL)
    assert left in (0, 1), left
    marker = asyncio.create_task(
        gated_backend.embed_images(pixels(1, metadata.image_size, seed=23))
    )
    await wait_pending(triton, GATED_IMAGE_MODEL, left + 1)  # the marker is queued too...
    control.release()
    await asyncio.gather(blocker, marker)
    counts = await statistics_once(triton.grpc_url, GATED_IMAGE_MODEL, before, success_count=2)
    # ...and is dropped, not run: had it run, it would share the marker's execution.
    assert counts["inference_count"] == 2, counts
    # A budget already spent reaches nothing at all.
    with pytest.raises(DeadlineExceeded):
        await gated_backend.embed_images(pixels(1, metadata.image_size, seed=24), timeout_s=0)
    assert (await gated_backend.embed_images(pixels(1, metadata.image_size, seed=25))).shape[0] == 1
    counts = await statistics_once(triton.grpc_url, GATED_IMAGE_MODEL, before, success_count=3)
    assert counts["inference_count"] == 3, counts


async def test_a_full_triton_queue_gives_overloaded(
    triton: TritonProcess, control: ModelControl, metadata: ModelMetadata
) -> None:
    backend = TritonBackend(
        url=triton.grpc_url,
        image_model=TINY_QUEUE_MODEL,
        default_timeout_s=PATIENT_S,
        max_batch_size=32,
    )
    await backend.start()
    try:
        control.hold()
        running = asyncio.create_task(backend.embed_images(pixels(1, metadata.image_size, 5)))
        await control.wait_held(1)
        queued = asyncio.create_task(backend.embed_images(pixels(1, metadata.image_size, 6)))
        await wait_pending(triton, TINY_QUEUE_MODEL, 1)
        # One running, one queued: the queue of one is full and Triton refuses at once.
        with pytest.raises(Overloaded, match="queue"):
            await backend.embed_images(pixels(1, metadata.image_size, 7))
        assert control.held() == [1]
        control.release()
        served = await asyncio.gather(running, queued)
    finally:
        control.release()
        await backend.aclose()
    assert [s.shape for s in served] == [(1, metadata.embedding_dim)] * 2


async def test_killed_triton_fails_fast_and_is_found_again_after_restart(
    backend: TritonBackend, triton: TritonProcess, metadata: ModelMetadata
) -> None:
    """Unavailable, not a wait for the deadline; and back once Triton is, by itself."""
    rows = pixels(2, metadata.image_size, seed=13)
    deadline_s = FAIL_FAST_DEADLINE_S
    # (outcome, seconds taken, time.monotonic() when the call began), per traffic call.
    outcomes: list[tuple[str, float, float]] = []
    stop_traffic = asyncio.Event()

    async def traffic() -> None:
        while not stop_traffic.is_set():
            started = time.monotonic()
            try:
                await backend.embed_images(rows, timeout_s=deadline_s)
                outcome = "ok"
            except BackendUnavailable:
                outcome = "unavailable"
            except Exception as exc:  # recorded, asserted on below
                outcome = repr(exc)
            outcomes.append((outcome, time.monotonic() - started, started))
            await asyncio.sleep(0.1)  # pacing, not a wait for anything

    def traffic_ok_since(moment: float) -> bool:
        return any(kind == "ok" and began >= moment for kind, _, began in outcomes)

    workers = [asyncio.create_task(traffic()) for _ in range(4)]
    try:
        await wait_for(lambda: traffic_ok_since(-math.inf), PATIENT_S, "traffic ok")
        pgid = triton.pid
        assert pgid is not None
        triton.kill()
        assert group_members(pgid) == []

        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await backend.embed_images(rows, timeout_s=deadline_s)
            # UNAVAILABLE itself says it did not wait for the deadline (that would be
            # DeadlineExceeded); half the deadline is a generous bound on the rest.
            assert time.monotonic() - started < deadline_s / 2
        assert not await backend.ready()  # bounded by ready_timeout_s, never raises

        await asyncio.to_thread(triton.start)  # the same ports as before
        restarted = time.monotonic()
        while True:
            try:
                await backend.embed_images(rows, timeout_s=deadline_s)
                break
            except BackendUnavailable:
                assert time.monotonic() - restarted < PATIENT_S, "no recovery after restart"
                await asyncio.sleep(0.1)
        recovered = time.monotonic()
        for _ in range(3):
            assert (await backend.embed_images(rows, timeout_s=deadline_s)).shape == (2, 64)
        assert await backend.ready()
        # The traffic recovers too (a call begun during the outage may still end
        # unavailable after this point: only calls begun since are judged).
        await wait_for(lambda: traffic_ok_since(recovered), PATIENT_S, "traffic ok again")
    finally:
        stop_traffic.set()
        await asyncio.gather(*workers)
    unexpected = [o for o in outcomes if o[0] not in ("ok", "unavailable")]
    assert not unexpected, unexpected
    slow_failures = [o for o in outcomes if o[0] == "unavailable" and o[1] > deadline_s / 2]
    assert not slow_failures, slow_failures
    since_recovery = [kind for kind, _, began in outcomes if began >= recovered]
    assert since_recovery and all(kind == "ok" for kind in since_recovery), since_recovery


def test_triton_command_starts_and_stops_cleanly(repository: Path, tmp_path: Path) -> None:
    log = tmp_path / "clipsvc-triton.out"
    command = [
        sys.executable, "-m", "service.processes.triton_server",
        "--repository", str(repository),
        "--port", "0", "--http-port", "0", "--metrics-port", "0",
        "--log-file", str(tmp_path / "tritonserver.log"),
    ]  # fmt: skip
    with log.open("wb") as out:
        launcher = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    server_pid: int | None = None
    try:
        deadline = time.monotonic() + 120
        while server_pid is None:
            assert launcher.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            for line in log.read_text().splitlines():
                if " ready (pid " in line:
                    server_pid = int(line.split(" ready (pid ")[1].split(")")[0])
                    http = line.split(" http ")[1].split()[0]
            time.sleep(0.1)
        assert server_version(http)
        assert group_members(server_pid)
        launcher.send_signal(signal.SIGINT)  # Ctrl-C
        assert launcher.wait(timeout=30) == 0, log.read_text()
        assert "tritonserver stopped" in log.read_text()
        assert group_members(server_pid) == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if server_pid is not None and group_members(server_pid):
            os.killpg(server_pid, signal.SIGKILL)


def test_a_model_that_does_not_load_fails_the_start_with_its_log(tmp_path: Path) -> None:
    require_triton()
    broken = tmp_path / "repo" / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.py").write_text("raise RuntimeError('this model cannot load')\n")
    (broken / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 1\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    )
    triton = TritonProcess(tmp_path / "repo", workdir=tmp_path / "triton", startup_timeout_s=20)
    try:
        with pytest.raises(TritonError, match="this model cannot load"):
            triton.start()
        assert not triton.running
    finally:
        triton.close()
