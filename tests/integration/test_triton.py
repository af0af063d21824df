"""The Triton backend against a real `tritonserver` (the pip wheel's, CPU, python backend).

One server per module serves every test; the fault test kills it and starts it again
on the same ports. The overload test uses a copy of `clip_image` with a queue of one
in the same repository.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

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
    add_model_variant,
    export_demo_repository,
    inference_statistics,
    require_triton,
    start_triton,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TINY_QUEUE_MODEL = "clip_image_tiny_queue"
FAST_FAIL_S = 2.0


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo CLIP (random weights) exported for the pip Triton, plus a tiny-queue copy."""
    require_triton()
    repo = tmp_path_factory.mktemp("triton_repo")
    export_demo_repository(repo)
    # No batching and room for one waiting request: a flood must be turned away.
    add_model_variant(
        repo,
        source=IMAGE_MODEL,
        name=TINY_QUEUE_MODEL,
        batching=BatchingOptions(
            max_batch_size=1, max_queue_delay_us=0, max_queue_size=1, torch_threads=1
        ),
    )
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


@pytest.fixture(scope="module")
async def backend(triton: TritonProcess, metrics: Metrics) -> AsyncIterator[TritonBackend]:
    """A started backend on the module's server."""
    # 7 is no default anywhere: after start() the limit can only be the configs' 32.
    backend = TritonBackend(
        url=triton.grpc_url, default_timeout_s=20.0, max_batch_size=7, metrics=metrics
    )
    await backend.start()
    yield backend
    await backend.aclose()


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
    backend: TritonBackend, triton: TritonProcess, metadata: ModelMetadata
) -> None:
    assert backend.name == "triton"
    assert backend.max_batch_size == BatchingOptions().max_batch_size != 7  # read, not kept
    assert backend.embedding_dim == metadata.embedding_dim
    assert await backend.ready()
    assert server_version(triton.http_url)


async def test_images_equal_the_torchscript_module(
    backend: TritonBackend, image_module: torch.jit.ScriptModule, metadata: ModelMetadata
) -> None:
    # 40 > max_batch_size (32): also covers the split into two requests.
    for batch, seed in ((1, 1), (5, 2), (40, 3)):
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
    backend: TritonBackend, triton: TritonProcess, metadata: ModelMetadata
) -> None:
    before = await inference_statistics(triton.grpc_url, IMAGE_MODEL)
    rows = pixels(64, metadata.image_size, seed=7)
    results = await asyncio.gather(
        *(backend.embed_images(rows[i : i + 1], timeout_s=30) for i in range(64))
    )
    # Triton records statistics after it has sent the responses: poll briefly.
    deadline = time.monotonic() + 5
    while True:
        after = await inference_statistics(triton.grpc_url, IMAGE_MODEL)
        inferences = after["inference_count"] - before["inference_count"]
        executions = after["execution_count"] - before["execution_count"]
        if inferences >= 64 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert inferences == 64
    print(f"64 concurrent single-image calls → {executions} Triton executions")
    assert executions <= inferences / 4, f"{executions} executions for {inferences} images"
    # Batched rows still come back to their own caller.
    batched = await backend.embed_images(rows)
    np.testing.assert_allclose(np.concatenate(results), batched, atol=1e-5, rtol=0)


async def test_concurrent_texts_of_mixed_lengths_share_executions(
    backend: TritonBackend, triton: TritonProcess, text_module: torch.jit.ScriptModule
) -> None:
    """Ragged batching: the dynamic batcher merges different token lengths (model.py groups)."""
    lengths = [8, 16, 24, 32] * 8
    texts = [f"caption number {i}" for i in range(len(lengths))]
    rows = [token_ids([t], n) for t, n in zip(texts, lengths, strict=True)]
    before = await inference_statistics(triton.grpc_url, TEXT_MODEL)
    results = await asyncio.gather(*(backend.embed_texts(r, timeout_s=30) for r in rows))
    deadline = time.monotonic() + 5
    while True:
        after = await inference_statistics(triton.grpc_url, TEXT_MODEL)
        inferences = after["inference_count"] - before["inference_count"]
        executions = after["execution_count"] - before["execution_count"]
        if inferences >= len(rows) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert inferences == len(rows)
    # Without allow_ragged_batch each length would run alone: about one execution a call.
    assert executions <= len(rows) / 2, f"{executions} executions for {len(rows)} texts"
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


async def test_a_short_deadline_gives_deadline_exceeded_not_a_hang(
    backend: TritonBackend, metadata: ModelMetadata
) -> None:
    rows = pixels(32, metadata.image_size, seed=11)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await backend.embed_images(rows, timeout_s=0.005)
    assert time.monotonic() - started < 1.0
    with pytest.raises(DeadlineExceeded):
        await backend.embed_images(rows, timeout_s=0)
    # The server is unharmed: a call with room succeeds.
    assert (await backend.embed_images(rows[:1], timeout_s=20)).shape[0] == 1


async def test_a_full_triton_queue_gives_overloaded(
    triton: TritonProcess, metadata: ModelMetadata
) -> None:
    backend = TritonBackend(
        url=triton.grpc_url,
        image_model=TINY_QUEUE_MODEL,
        default_timeout_s=30.0,
        max_batch_size=32,
    )
    await backend.start()
    try:
        rows = pixels(1, metadata.image_size, seed=5)
        results = await asyncio.gather(
            *(backend.embed_images(rows) for _ in range(48)), return_exceptions=True
        )
    finally:
        await backend.aclose()
    refused = [r for r in results if isinstance(r, Overloaded)]
    served = [r for r in results if isinstance(r, np.ndarray)]
    others = [r for r in results if isinstance(r, BaseException) and r not in refused]
    assert not others, others
    assert served, "the request being executed and the queued one are served"
    assert refused, "a queue of one cannot hold 48 requests"
    assert "queue" in str(refused[0])


async def test_killed_triton_fails_fast_and_is_found_again_after_restart(
    backend: TritonBackend, triton: TritonProcess, metadata: ModelMetadata
) -> None:
    rows = pixels(2, metadata.image_size, seed=13)
    outcomes: list[tuple[str, float]] = []
    stop_traffic = asyncio.Event()

    async def traffic() -> None:
        while not stop_traffic.is_set():
            started = time.monotonic()
            try:
                await backend.embed_images(rows, timeout_s=10)
                outcomes.append(("ok", time.monotonic() - started))
            except BackendUnavailable:
                outcomes.append(("unavailable", time.monotonic() - started))
            except Exception as exc:  # recorded, asserted on below
                outcomes.append((repr(exc), time.monotonic() - started))
            await asyncio.sleep(0.1)

    workers = [asyncio.create_task(traffic()) for _ in range(4)]
    try:
        await asyncio.sleep(0.5)
        assert any(kind == "ok" for kind, _ in outcomes), outcomes
        pgid = triton.pid
        assert pgid is not None
        triton.kill()
        assert group_members(pgid) == []

        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await backend.embed_images(rows, timeout_s=10)
            assert time.monotonic() - started < FAST_FAIL_S
        started = time.monotonic()
        assert not await backend.ready()
        assert time.monotonic() - started < FAST_FAIL_S + 1

        await asyncio.to_thread(triton.start)  # the same ports as before
        restarted = time.monotonic()
        while True:
            try:
                await backend.embed_images(rows, timeout_s=10)
                break
            except BackendUnavailable:
                assert time.monotonic() - restarted < 10, "no recovery 10 s after restart"
                await asyncio.sleep(0.1)
        for _ in range(3):
            assert (await backend.embed_images(rows, timeout_s=10)).shape == (2, 64)
        assert await backend.ready()
    finally:
        stop_traffic.set()
        await asyncio.gather(*workers)
    unexpected = [o for o in outcomes if o[0] not in ("ok", "unavailable")]
    assert not unexpected, unexpected
    slow_failures = [o for o in outcomes if o[0] == "unavailable" and o[1] > FAST_FAIL_S]
    assert not slow_failures, slow_failures
    assert outcomes[-1][0] == "ok"


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
