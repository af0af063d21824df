"""Model identity and Triton channel health without a server (issue 14, items 4 and 7).

`TritonBackend` reads the identity `clipsvc export` stamps into both `config.pbtxt`
files and refuses (FAILED_PRECONDITION) while Triton serves anything else; its channel
has keepalive pings, and a passed deadline makes it stale only when the channel itself
stopped answering. These tests drive it through a fake tritonclient; the same checks
against a real `tritonserver` are in tests/integration/test_triton_identity.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from service.backends import triton as triton_module
from service.backends.triton import ServedIdentity, TritonBackend
from service.errors import DeadlineExceeded, ModelMismatch
from service.metrics import Metrics
from service.model.metadata import (
    IMAGE_MODEL,
    MODEL_ID_PARAMETER,
    TEXT_MODEL,
    WEIGHTS_PARAMETER,
)
from service.processes.metric_samples import sample
from service.server.status import status_for


# ====================================================================== the stamp
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
        #: Names of the methods called on this client, in order.
        self.calls: list[str] = []
        server.clients.append(self)

    async def is_server_ready(self, client_timeout: float | None = None) -> bool:
        self.calls.append("is_server_ready")
        return True

    async def is_model_ready(
        self, name: str, version: str = "", client_timeout: float | None = None
    ) -> bool:
        self.calls.append("is_model_ready")
        return True

    async def is_server_live(self, client_timeout: float | None = None) -> bool:
        self.calls.append("is_server_live")
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
        self.calls.append("get_model_config")
        return {"config": self.server.config(name)}

    async def infer(self, model_name: str, inputs: list[Any], **kwargs: Any) -> _FakeResult:
        self.calls.append("infer")
        rows = inputs[0]._get_content()  # what the backend sent
        shape = inputs[0].shape()
        array = np.frombuffer(rows, dtype=np.int64 if len(shape) == 2 else np.uint8)
        array = array.reshape(shape)
        if self.server.hangs(array):
            await asyncio.sleep(kwargs.get("client_timeout") or 0)
            raise _deadline_error()
        self.server.during_infer()
        identity = self.server.identity[model_name]
        value = 1.0 if identity == X else 2.0
        return _FakeResult(np.full((shape[0], DIM), value, dtype=np.float32))

    async def close(self) -> None:
        self.calls.append("close")


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
    return sample(metrics.registry, "clip_model_mismatch")


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

    async def slow_call() -> None:
        with pytest.raises(DeadlineExceeded):
            await fake_backend.embed_texts(slow, timeout_s=0.2)

    async def fast_calls() -> None:
        for _ in range(3):
            await fake_backend.embed_texts(TOKENS)
            await asyncio.sleep(0.01)

    await asyncio.gather(slow_call(), fast_calls())
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


# ====================================================================== replicas
REPLICAS = "ipv4:10.0.0.1:8001,10.0.0.2:8001"
PROBE_CALLS = {"is_server_ready", "is_model_ready", "get_model_config"}


@pytest.fixture
async def replica_backend(fake_triton: FakeTriton) -> AsyncIterator[TritonBackend]:
    backend = TritonBackend(
        url=REPLICAS,
        default_timeout_s=5.0,
        max_batch_size=8,
        expected_model_id=X.model_id,
        expected_weights_sha256=X.weights_sha256,
    )
    await backend.start()
    yield backend
    await backend.aclose()


async def test_a_single_address_keeps_one_channel_for_calls_and_probes(
    fake_triton: FakeTriton, fake_backend: TritonBackend
) -> None:
    for _ in range(3):
        assert (await fake_backend.embed_texts(TOKENS))[0, 0] == 1.0
        assert await fake_backend.ready()
    assert len(fake_triton.clients) == 1
    assert fake_backend._probe_channel is None
    (client,) = fake_triton.clients
    assert set(client.calls) == PROBE_CALLS | {"infer"}
    assert "grpc.lb_policy_name" not in dict(client.channel_args)  # pick-first


async def test_probes_of_several_replicas_leave_the_inference_channel_alone(
    fake_triton: FakeTriton, replica_backend: TritonBackend
) -> None:
    """Round robin: a probe's calls on the inference channel would move its rotation
    on between two calls (and pin sequential calls to one replica)."""
    for _ in range(5):
        assert (await replica_backend.embed_texts(TOKENS))[0, 0] == 1.0
        assert await replica_backend.ready()
    inference, probe = fake_triton.clients
    for client in (inference, probe):
        assert dict(client.channel_args)["grpc.lb_policy_name"] == "round_robin"
    # The identity checked once at start(), then only inference: a probe's check on
    # its own channel does not make inference check again.
    assert inference.calls == ["get_model_config"] * 2 + ["infer"] * 5
    assert set(probe.calls) == PROBE_CALLS
    assert probe.calls.count("get_model_config") == 2 * 5


async def test_a_mismatch_a_probe_sees_stops_inference_until_its_channel_checks_again(
    fake_triton: FakeTriton, replica_backend: TritonBackend
) -> None:
    assert (await replica_backend.embed_texts(TOKENS))[0, 0] == 1.0
    inference = fake_triton.clients[0]

    fake_triton.identity = {IMAGE_MODEL: Y, TEXT_MODEL: Y}  # reloaded in place
    assert not await replica_backend.ready()
    with pytest.raises(ModelMismatch):
        await replica_backend.embed_texts(TOKENS)

    fake_triton.identity = {IMAGE_MODEL: X, TEXT_MODEL: X}
    assert await replica_backend.ready()  # on the probe channel
    reads = inference.calls.count("get_model_config")
    assert (await replica_backend.embed_texts(TOKENS))[0, 0] == 1.0
    assert inference.calls.count("get_model_config") == reads + 2  # checked on its own


async def test_the_probe_channel_is_renewed_when_stale_and_closed_with_the_backend(
    fake_triton: FakeTriton,
) -> None:
    backend = TritonBackend(url=REPLICAS, default_timeout_s=5.0, max_batch_size=8)
    await backend.start()
    try:
        assert await backend.ready()
        inference, probe = backend._channel, backend._probe_channel
        assert inference is not None and probe is not None and inference is not probe
        probe.stale = True
        assert await backend.ready()
        assert backend._probe_channel is not probe
        assert backend._channel is inference
        assert len(fake_triton.clients) == 3
    finally:
        await backend.aclose()
    assert backend._channel is None and backend._probe_channel is None
    assert all("close" in client.calls for client in fake_triton.clients)


@pytest.mark.parametrize(
    ("url", "renewed"), [("dns:///triton-headless:8001", True), (REPLICAS, False)]
)
async def test_only_a_dns_target_is_resolved_again_every_refresh_interval(
    fake_triton: FakeTriton, monkeypatch: pytest.MonkeyPatch, url: str, renewed: bool
) -> None:
    """A headless Service's addresses change with scale-ups; gRPC re-resolves only when a
    connection fails, so a `dns:` channel is renewed every `_DNS_REFRESH_S` (0 here: at
    every call). A fixed address list has nothing new to learn and keeps its channel."""
    monkeypatch.setattr(triton_module, "_DNS_REFRESH_S", 0.0)
    backend = TritonBackend(url=url, default_timeout_s=5.0, max_batch_size=8)
    await backend.start()
    first = backend._channel
    assert first is not None
    try:
        for _ in range(3):
            assert (await backend.embed_texts(TOKENS))[0, 0] == 1.0
        assert (backend._channel is not first) == renewed
        assert dict(first.client.channel_args)["grpc.lb_policy_name"] == "round_robin"
    finally:
        await backend.aclose()
    assert "close" in first.client.calls  # retired (or closed with the backend)
