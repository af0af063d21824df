"""Model identity handshake and Triton channel health (issue 14, items 4 and 7).

A gateway serves only the model its `metadata.json` describes: `clipsvc export` stamps
the model id and weights hash into both `config.pbtxt` files, and the Triton backend
refuses (FAILED_PRECONDITION, health NOT_SERVING) while Triton serves anything else,
checking again whenever Triton restarts or the channel reconnects. The channel has
keepalive pings, and a passed deadline makes it stale only when the channel itself
stopped answering.

The integration tests share one real `tritonserver` whose repository they switch
between two exports (X: the trained demo weights, Y: random weights) by restarting it
on the same ports; the unit tests drive `TritonBackend` through a fake tritonclient.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import open_clip
import pytest
import redis as redis_lib
import torch
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from service.api.clip.v1 import clip_pb2
from service.backends import triton as triton_module
from service.backends.triton import ServedIdentity, TritonBackend
from service.errors import BackendUnavailable, DeadlineExceeded, ModelMismatch
from service.metrics import Metrics
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
from service.server.status import status_for
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


def test_served_identity_is_read_from_the_model_config_json() -> None:
    stamped = {
        "name": "clip_text",
        "parameters": {
            "TORCH_THREADS": {"string_value": "1"},
            MODEL_ID_PARAMETER: {"string_value": "m/p@0123456789ab"},
            WEIGHTS_PARAMETER: {"string_value": "0123456789ab" + "f" * 52},
        },
    }
    identity = ServedIdentity.from_config(stamped)
    assert identity == ServedIdentity("m/p@0123456789ab", "0123456789ab" + "f" * 52)
    assert identity.stamped
    # A repository exported before the stamp: no parameters, or only the flavor's own.
    assert ServedIdentity.from_config({"name": "clip_text"}) == ServedIdentity(None, None)
    old = {"parameters": {"TORCH_THREADS": {"string_value": "1"}}}
    assert not ServedIdentity.from_config(old).stamped
    half = {"parameters": {MODEL_ID_PARAMETER: {"string_value": "m/p@0123456789ab"}}}
    assert not ServedIdentity.from_config(half).stamped
    empty = {"parameters": {MODEL_ID_PARAMETER: {"string_value": ""}}}
    assert ServedIdentity.from_config(empty).model_id is None
    # Only what the gateway knows is compared; a field it leaves open is not.
    assert identity.satisfies(ServedIdentity("m/p@0123456789ab", None))
    assert not identity.satisfies(ServedIdentity("m/p@0123456789ab", "0" * 64))
    assert not ServedIdentity(None, None).satisfies(ServedIdentity("m/p@0123456789ab", None))


def test_model_mismatch_is_failed_precondition() -> None:
    assert status_for(ModelMismatch("x")) == grpc.StatusCode.FAILED_PRECONDITION


# ====================================================================== fake tritonclient
X = ServedIdentity("clip-demo-shapes/x@" + "a" * 12, "a" * 64)
Y = ServedIdentity("clip-demo-shapes/y@" + "b" * 12, "b" * 64)
DIM = 4


def _deadline_error() -> InferenceServerException:
    return InferenceServerException(msg="Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")


@dataclass
class FakeTriton:
    """What the fake clients answer: one server behind every channel."""

    identity: dict[str, ServedIdentity | None] = field(
        default_factory=lambda: {IMAGE_MODEL: X, TEXT_MODEL: X}
    )
    #: rows → True when that call hangs until its gRPC deadline.
    hangs: Callable[[np.ndarray], bool] = lambda rows: False
    #: When set, a hanging call's deadline passes when this event is set (not at its
    #: client_timeout): the test decides what happened before it.
    deadline_passes: asyncio.Event | None = None
    hung_calls: int = 0
    live_hangs: bool = False
    #: Runs inside each infer call, before it answers.
    during_infer: Callable[[], None] = lambda: None
    clients: list[FakeClient] = field(default_factory=list)
    live_calls: int = 0

    def config(self, name: str) -> dict[str, Any]:
        is_image = name == IMAGE_MODEL
        config: dict[str, Any] = {
            "name": name,
            "max_batch_size": 8,
            "input": [
                {
                    "name": "PIXELS__0" if is_image else "TOKENS__0",
                    "data_type": "TYPE_UINT8" if is_image else "TYPE_INT64",
                    "dims": ["3", "4", "4"] if is_image else ["-1"],
                }
            ],
            "output": [{"name": "EMBEDDINGS__0", "data_type": "TYPE_FP32", "dims": [str(DIM)]}],
            "parameters": {"TORCH_THREADS": {"string_value": "1"}},
        }
        identity = self.identity[name]
        if identity is not None:
            config["parameters"][MODEL_ID_PARAMETER] = {"string_value": identity.model_id}
            config["parameters"][WEIGHTS_PARAMETER] = {"string_value": identity.weights_sha256}
        return config


class _FakeResult:
    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    def as_numpy(self, name: str) -> np.ndarray:
        return self._array


class FakeClient:
    """Stands in for `tritonclient.grpc.aio.InferenceServerClient`."""

    def __init__(self, server: FakeTriton, url: str, channel_args: Any = None) -> None:
        self.server = server
        self.url = url
        self.channel_args = channel_args
        server.clients.append(self)

    async def is_server_ready(self, client_timeout: float | None = None) -> bool:
        return True

    async def is_model_ready(
        self, name: str, version: str = "", client_timeout: float | None = None
    ) -> bool:
        return True

    async def is_server_live(self, client_timeout: float | None = None) -> bool:
        self.server.live_calls += 1
        if self.server.live_hangs:
            await asyncio.sleep(client_timeout or 0)
            raise _deadline_error()
        return True

    async def get_model_config(
        self,
        name: str,
        version: str = "",
        as_json: bool = False,
        client_timeout: float | None = None,
    ) -> dict[str, Any]:
        return {"config": self.server.config(name)}

    async def infer(self, model_name: str, inputs: list[Any], **kwargs: Any) -> _FakeResult:
        rows = inputs[0]._get_content()  # what the backend sent
        shape = inputs[0].shape()
        array = np.frombuffer(rows, dtype=np.int64 if len(shape) == 2 else np.uint8)
        array = array.reshape(shape)
        if self.server.hangs(array):
            self.server.hung_calls += 1
            if self.server.deadline_passes is not None:
                await self.server.deadline_passes.wait()
            else:
                await asyncio.sleep(kwargs.get("client_timeout") or 0)
            raise _deadline_error()
        self.server.during_infer()
        identity = self.server.identity[model_name]
        value = 1.0 if identity == X else 2.0
        return _FakeResult(np.full((shape[0], DIM), value, dtype=np.float32))

    async def close(self) -> None:
        return None


@pytest.fixture
def fake_triton(monkeypatch: pytest.MonkeyPatch) -> FakeTriton:
    server = FakeTriton()
    monkeypatch.setattr(
        triton_module.triton_aio,
        "InferenceServerClient",
        lambda url, channel_args=None, **_: FakeClient(server, url, channel_args),
    )
    # Replacing a stale channel at once keeps the unit tests free of clock waits.
    monkeypatch.setattr(triton_module, "_RECREATE_INTERVAL_S", 0.0)
    return server


@pytest.fixture
async def fake_backend(fake_triton: FakeTriton) -> AsyncIterator[TritonBackend]:
    backend = TritonBackend(
        url="triton:8001",
        default_timeout_s=5.0,
        max_batch_size=8,
        metrics=Metrics(),
        expected_model_id=X.model_id,
        expected_weights_sha256=X.weights_sha256,
    )
    await backend.start()
    yield backend
    await backend.aclose()


TOKENS = np.array([[49406, 320, 49407]], dtype=np.int64)


def _mismatch_gauge(backend: TritonBackend) -> float:
    metrics = backend._metrics
    assert metrics is not None
    return metrics.registry.get_sample_value("clip_model_mismatch") or 0.0


async def test_fake_triton_serving_another_model_is_refused_until_it_serves_ours(
    fake_triton: FakeTriton, fake_backend: TritonBackend
) -> None:
    assert await fake_backend.ready()
    assert (await fake_backend.embed_texts(TOKENS))[0, 0] == 1.0
    assert _mismatch_gauge(fake_backend) == 0

    fake_triton.identity = {IMAGE_MODEL: Y, TEXT_MODEL: Y}  # reloaded in place
    assert not await fake_backend.ready()  # every probe reads the configs again
    with pytest.raises(ModelMismatch) as err:
        await fake_backend.embed_texts(TOKENS)
    assert X.model_id in str(err.value) and Y.model_id in str(err.value)
    assert _mismatch_gauge(fake_backend) == 1

    fake_triton.identity = {IMAGE_MODEL: X, TEXT_MODEL: X}
    assert await fake_backend.ready()
    assert (await fake_backend.embed_texts(TOKENS))[0, 0] == 1.0
    assert _mismatch_gauge(fake_backend) == 0


async def test_one_tower_of_another_model_is_a_mismatch(
    fake_triton: FakeTriton, fake_backend: TritonBackend
) -> None:
    fake_triton.identity = {IMAGE_MODEL: X, TEXT_MODEL: Y}
    assert not await fake_backend.ready()
    with pytest.raises(ModelMismatch, match="clip_text"):
        await fake_backend.embed_images(np.zeros((1, 3, 4, 4), dtype=np.uint8))


async def test_a_repository_exported_without_the_stamp_is_refused_with_a_reexport_hint(
    fake_triton: FakeTriton,
) -> None:
    fake_triton.identity = {IMAGE_MODEL: None, TEXT_MODEL: None}
    backend = TritonBackend(
        url="triton:8001",
        default_timeout_s=5.0,
        max_batch_size=8,
        expected_model_id=X.model_id,
        expected_weights_sha256=X.weights_sha256,
    )
    await backend.start()
    try:
        assert not await backend.ready()
        with pytest.raises(ModelMismatch) as err:
            await backend.embed_texts(TOKENS)
    finally:
        await backend.aclose()
    assert "re-export" in str(err.value)
    assert X.model_id in str(err.value)


async def test_vectors_computed_across_a_reconnect_are_checked_before_they_are_returned(
    fake_triton: FakeTriton, fake_backend: TritonBackend
) -> None:
    assert (await fake_backend.embed_texts(TOKENS))[0, 0] == 1.0

    def swap_under_the_call() -> None:
        # What a Triton restart onto another model looks like from inside a call: the
        # connectivity watcher sees the channel reconnect, the answer comes from Y.
        fake_triton.identity = {IMAGE_MODEL: Y, TEXT_MODEL: Y}
        channel = fake_backend._channel
        assert channel is not None
        channel.epoch += 1

    fake_triton.during_infer = swap_under_the_call
    with pytest.raises(ModelMismatch):
        await fake_backend.embed_texts(TOKENS)


async def test_the_channel_has_keepalive_pings(
    fake_triton: FakeTriton, fake_backend: TritonBackend
) -> None:
    args = dict(fake_triton.clients[-1].channel_args)
    assert args["grpc.keepalive_time_ms"] == 10_000
    assert args["grpc.keepalive_timeout_ms"] == 5_000
    assert args["grpc.keepalive_permit_without_calls"] == 1
    # More than two pings without data draw a GOAWAY "too_many_pings" from Triton.
    assert args["grpc.http2.max_pings_without_data"] == 2
    assert args["grpc.http2.ping_timeout_ms"] == 5_000  # or keepalive waits a minute
    assert args["grpc.max_reconnect_backoff_ms"] == 2000  # the old arguments stay


async def _probes_done(backend: TritonBackend) -> None:
    channel = backend._channel
    if channel is not None and channel.probe is not None:
        await asyncio.gather(channel.probe, return_exceptions=True)


async def test_a_deadline_on_a_channel_that_stopped_answering_makes_it_stale(
    fake_triton: FakeTriton, fake_backend: TritonBackend
) -> None:
    fake_triton.hangs = lambda rows: True
    fake_triton.live_hangs = True
    first = fake_backend._channel
    with pytest.raises(DeadlineExceeded):
        await fake_backend.embed_texts(TOKENS, timeout_s=0.05)
    await _probes_done(fake_backend)
    assert fake_triton.live_calls == 1
    assert first is not None and first.stale
    # The next call reconnects: a new client, which checks the identity again.
    fake_triton.hangs = lambda rows: False
    assert (await fake_backend.embed_texts(TOKENS))[0, 0] == 1.0
    assert len(fake_triton.clients) == 2
    assert fake_backend._channel is not first


async def test_a_slow_call_on_a_channel_that_still_answers_keeps_it(
    fake_triton: FakeTriton, fake_backend: TritonBackend
) -> None:
    fake_triton.hangs = lambda rows: True  # this call is slow, the server is fine
    first = fake_backend._channel
    with pytest.raises(DeadlineExceeded):
        await fake_backend.embed_texts(TOKENS, timeout_s=0.05)
    await _probes_done(fake_backend)
    assert fake_triton.live_calls == 1  # one cheap liveness call, answered
    assert first is not None and not first.stale
    fake_triton.hangs = lambda rows: False
    await fake_backend.embed_texts(TOKENS)
    assert fake_backend._channel is first and len(fake_triton.clients) == 1


async def test_a_slow_call_while_others_are_answered_costs_nothing(
    fake_triton: FakeTriton, fake_backend: TritonBackend
) -> None:
    slow = np.array([[49406, 999, 49407]], dtype=np.int64)
    fake_triton.hangs = lambda rows: bool(rows[0, 1] == 999)
    fake_triton.live_hangs = True  # would make the channel stale if it were asked
    fake_triton.deadline_passes = asyncio.Event()
    slow_call = asyncio.create_task(fake_backend.embed_texts(slow, timeout_s=60.0))
    for _ in range(100):  # loop turns, no clock: until the slow call is at Triton
        if fake_triton.hung_calls:
            break
        await asyncio.sleep(0)
    assert fake_triton.hung_calls == 1
    for _ in range(3):  # answered while the slow call is out
        await fake_backend.embed_texts(TOKENS)
    fake_triton.deadline_passes.set()
    with pytest.raises(DeadlineExceeded):
        await slow_call
    await _probes_done(fake_backend)
    assert fake_triton.live_calls == 0
    channel = fake_backend._channel
    assert channel is not None and not channel.stale
    assert len(fake_triton.clients) == 1


async def test_a_deadline_on_a_replaced_channel_leaves_the_new_one_alone(
    fake_triton: FakeTriton, fake_backend: TritonBackend
) -> None:
    old = fake_backend._channel
    assert old is not None
    started = time.monotonic()
    old.stale = True
    new = fake_backend._get_channel()
    assert new is not old
    fake_triton.live_hangs = True
    fake_backend._deadline_passed(old, started)  # no longer the channel calls use
    await _probes_done(fake_backend)
    assert fake_triton.live_calls == 0
    assert not new.stale


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


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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
