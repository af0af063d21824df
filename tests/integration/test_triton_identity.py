"""Model identity handshake and Triton channel health (issue 14, items 4 and 7).

A gateway serves only the model its `metadata.json` describes: `clipsvc export` stamps
the model id and weights hash into both `config.pbtxt` files, and the Triton backend
refuses (FAILED_PRECONDITION, health NOT_SERVING) while Triton serves anything else,
checking again whenever Triton restarts or the channel reconnects. The channel has
keepalive pings, and a passed deadline makes it stale only when the channel itself
stopped answering.

The integration tests share one real `tritonserver` whose repository they switch
between two exports (X: the trained demo weights, Y: random weights) by restarting it
on the same ports. tests/unit/test_triton_identity.py drives `TritonBackend` through a
fake tritonclient.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import open_clip
import pytest
import redis as redis_lib
import torch
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2

from service.api.clip.v1 import clip_pb2
from service.backends.triton import TritonBackend
from service.errors import BackendUnavailable, DeadlineExceeded, ModelMismatch
from service.model import configs as model_configs
from service.model.export import export_model
from service.model.metadata import (
    IMAGE_MODEL,
    MODEL_ID_PARAMETER,
    TEXT_MODEL,
    WEIGHTS_PARAMETER,
    ModelMetadata,
)
from service.processes.gateway import gateway_settings
from service.processes.metric_samples import sample, scrape
from service.processes.redis_server import RedisServer
from service.processes.triton_server import TritonProcess
from service.server.app import Gateway
from service.wiring import build_gateway
from tests.support.gateway import stub_for
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.triton import export_demo_repository, require_triton, start_triton

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Generous: Triton restarts in 3-10 s on this machine; nothing below waits this long
# unless something is broken.
POLL_DEADLINE_S = 120.0


# ====================================================================== the stamp
@pytest.mark.parametrize("flavor", ["python", "pytorch"])
def test_export_stamps_the_identity_into_both_configs(flavor: str, tmp_path: Path) -> None:
    summary = export_model("clip-demo-shapes", "none", tmp_path, flavor=flavor, progress=False)
    metadata = summary.metadata
    for name in (IMAGE_MODEL, TEXT_MODEL):
        text = (tmp_path / name / "config.pbtxt").read_text()
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        parameters = {key: value.string_value for key, value in config.parameters.items()}
        assert parameters[MODEL_ID_PARAMETER] == metadata.model_id
        assert parameters[WEIGHTS_PARAMETER] == metadata.weights_sha256
        assert len(metadata.weights_sha256) == 64
        # The flavor's own parameters are still there.
        own = "TORCH_THREADS" if flavor == "python" else "INFERENCE_MODE"
        assert own in parameters


# ====================================================================== real tritonserver
@pytest.fixture(scope="module")
def model_x(demo_model: ExportedModel) -> ExportedModel:
    """X: the trained demo CLIP (the session's export)."""
    return demo_model


@pytest.fixture(scope="module")
def repo_y(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Y: the same architecture with random weights: another model id and weights hash."""
    require_triton()
    out = tmp_path_factory.mktemp("model_y")
    torch.manual_seed(4321)
    export_demo_repository(out)
    return out


@pytest.fixture(scope="module")
def triton(repo_y: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    """One server for the module; tests switch its repository (same ports)."""
    with start_triton(repo_y, workdir=tmp_path_factory.mktemp("triton_identity")) as server:
        yield server


def _serve(triton: TritonProcess, repository: Path) -> None:
    repository = Path(repository).resolve()
    if triton.running and triton.repository == repository:
        return
    triton.repository = repository
    if triton.running:
        triton.restart()
    else:
        triton.start()


async def serve(triton: TritonProcess, repository: Path) -> None:
    """Make `triton` serve `repository`, restarting it on the same ports if needed."""
    await asyncio.to_thread(_serve, triton, repository)


@contextlib.asynccontextmanager
async def gateway_x(
    model_x: ExportedModel, triton: TritonProcess, redis_server: RedisServer
) -> AsyncIterator[Gateway]:
    """A gateway whose metadata.json is X's, on the module's Triton and an empty Redis.

    Started, not waited for: whether it becomes SERVING is what the tests look at.
    """
    redis_lib.Redis.from_url(redis_server.url).flushall()
    settings = gateway_settings(
        model_x.repository,
        backend="triton",
        triton_url=triton.grpc_url,
        redis_url=redis_server.url,
        local_cache_items=0,  # every vector that is cached at all lands in Redis
    )
    gateway = build_gateway(settings)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop(1.0)


def _want_text(model: ExportedModel, texts: list[str]) -> np.ndarray:
    """open_clip's own text embedding of the model X weights."""
    model_configs.register()
    tokenizer = open_clip.get_tokenizer(model.name)
    with torch.no_grad():
        return model.clip.encode_text(tokenizer(texts), normalize=True).numpy()


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return reply.status


async def _wait_health(port: int, status: int) -> None:
    deadline = time.monotonic() + POLL_DEADLINE_S
    while await _health(port) != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        await asyncio.sleep(0.1)


async def _embed_text_until_refused(
    gateway: Gateway, model: ExportedModel, *, prefix: str
) -> grpc.aio.AioRpcError:
    """Call EmbedText with fresh texts until a call fails other than UNAVAILABLE.

    Every OK answer on the way must be model X's vector: never one of another model.
    """
    deadline = time.monotonic() + POLL_DEADLINE_S
    async with stub_for(gateway.port) as stub:
        for i in range(100_000):
            text = f"{prefix} {i}"
            try:
                reply = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=[text]), timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    return exc
            else:
                got = np.array(reply.embeddings[0].values, dtype=np.float32)
                np.testing.assert_allclose(got, _want_text(model, [text])[0], atol=1e-5, rtol=0)
            assert time.monotonic() < deadline, "the gateway never refused"
            await asyncio.sleep(0.05)
    raise AssertionError("unreachable")


def _assert_names_both(message: str, expected: ModelMetadata, served: ModelMetadata) -> None:
    assert expected.model_id in message, message
    assert served.model_id in message, message
    assert expected.model_id != served.model_id


async def test_gateway_refuses_a_triton_that_serves_another_model(
    model_x: ExportedModel, repo_y: Path, triton: TritonProcess, redis_server: RedisServer
) -> None:
    await serve(triton, repo_y)
    async with gateway_x(model_x, triton, redis_server) as gateway:
        await _refused_with_nothing_cached(gateway, model_x, repo_y, redis_server)


async def _refused_with_nothing_cached(
    gateway_x: Gateway, model_x: ExportedModel, repo_y: Path, redis_server: RedisServer
) -> None:
    refused = await _embed_text_until_refused(gateway_x, model_x, prefix="mismatch")
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION, refused
    x, y = ModelMetadata.load(model_x.repository), ModelMetadata.load(repo_y)
    _assert_names_both(refused.details() or "", x, y)

    async with stub_for(gateway_x.port) as stub:
        image = encode(photo_like(80, 60, seed=3), "PNG")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[image]), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Classify(
                clip_pb2.ClassifyRequest(images=[image], labels=["red circle", "blue star"]),
                timeout=30,
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    assert not await gateway_x.health.check_once()  # a real probe, not a stale flag
    assert await _health(gateway_x.port) == NOT_SERVING
    assert sample(scrape(gateway_x.metrics_port or 0), "clip_model_mismatch") == 1
    assert redis_lib.Redis.from_url(redis_server.url).dbsize() == 0, "Y's vectors were cached"


async def test_gateway_serves_again_once_triton_serves_its_model(
    model_x: ExportedModel, repo_y: Path, triton: TritonProcess, redis_server: RedisServer
) -> None:
    await serve(triton, repo_y)
    async with gateway_x(model_x, triton, redis_server) as gateway:
        refused = await _embed_text_until_refused(gateway, model_x, prefix="before")
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION, refused

        await serve(triton, model_x.repository)  # same ports; the gateway is not restarted
        await _wait_health(gateway.port, SERVING)
        texts = ["a red circle", "a photo of a blue star"]
        async with stub_for(gateway.port) as stub:
            reply = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts), timeout=30)
        got = np.array([e.values for e in reply.embeddings], dtype=np.float32)
        np.testing.assert_allclose(got, _want_text(model_x, texts), atol=1e-5, rtol=0)
        assert sample(scrape(gateway.metrics_port or 0), "clip_model_mismatch") == 0


async def test_gateway_stops_serving_when_triton_comes_back_with_another_model(
    model_x: ExportedModel, repo_y: Path, triton: TritonProcess, redis_server: RedisServer
) -> None:
    await serve(triton, model_x.repository)
    async with gateway_x(model_x, triton, redis_server) as gateway:
        await _wait_health(gateway.port, SERVING)

        # A rolling upgrade swaps the model under the gateway while callers keep calling.
        restart = asyncio.create_task(serve(triton, repo_y))
        try:
            refused = await _embed_text_until_refused(gateway, model_x, prefix="rolling")
        finally:
            await restart
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION, refused
        x, y = ModelMetadata.load(model_x.repository), ModelMetadata.load(repo_y)
        _assert_names_both(refused.details() or "", x, y)
        await _wait_health(gateway.port, NOT_SERVING)
        assert sample(scrape(gateway.metrics_port or 0), "clip_model_mismatch") == 1


async def test_backend_never_returns_vectors_of_a_model_swapped_between_two_calls(
    model_x: ExportedModel, repo_y: Path, triton: TritonProcess
) -> None:
    """No call fails while Triton restarts (none is made), and gRPC reconnects silently:
    only the connectivity watcher can tell that the next answer comes from elsewhere."""
    x = ModelMetadata.load(model_x.repository)
    await serve(triton, model_x.repository)
    backend = TritonBackend(
        url=triton.grpc_url,
        default_timeout_s=30.0,
        max_batch_size=32,
        expected_model_id=x.model_id,
        expected_weights_sha256=x.weights_sha256,
    )
    await backend.start()
    try:
        tokens = np.array([[49406, 320, 49407]], dtype=np.int64)
        assert (await backend.embed_texts(tokens)).shape == (1, x.embedding_dim)
        await serve(triton, repo_y)
        with pytest.raises(ModelMismatch) as err:
            await backend.embed_texts(tokens)
        _assert_names_both(str(err.value), x, ModelMetadata.load(repo_y))
        assert not await backend.ready()
    finally:
        await backend.aclose()


async def test_keepalive_ends_a_call_to_a_triton_that_stopped_answering(
    model_x: ExportedModel, triton: TritonProcess
) -> None:
    """A hung server keeps its TCP connections open (the kernel still acknowledges):
    only unanswered keepalive pings end a call long before its 60 s deadline."""
    await serve(triton, model_x.repository)
    backend = TritonBackend(
        url=triton.grpc_url,
        default_timeout_s=60.0,
        max_batch_size=32,
        keepalive_time_s=1.0,
        keepalive_timeout_s=1.0,
    )
    await backend.start()
    tokens = np.array([[49406, 320, 49407]], dtype=np.int64)
    try:
        await backend.embed_texts(tokens)
        pid = triton.pid
        assert pid is not None
        os.killpg(pid, signal.SIGSTOP)
        try:
            with pytest.raises(BackendUnavailable):
                await backend.embed_texts(tokens, timeout_s=60.0)
        finally:
            os.killpg(pid, signal.SIGCONT)
        deadline = time.monotonic() + POLL_DEADLINE_S
        while True:  # and it recovers once the server answers again
            try:
                await backend.embed_texts(tokens, timeout_s=10.0)
                break
            except (BackendUnavailable, DeadlineExceeded):
                assert time.monotonic() < deadline, "no recovery after SIGCONT"
                await asyncio.sleep(0.1)
    finally:
        await backend.aclose()
