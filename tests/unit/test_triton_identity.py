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
from service.backends.triton import ServedIdentity, Target, TritonBackend
from service.errors import BackendUnavailable, DeadlineExceeded, ModelMismatch
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
    #: Addresses that serve something else than `identity` (a foreign export).
    per_address: dict[str, dict[str, ServedIdentity | None]] = field(default_factory=dict)
    #: Addresses whose readiness is false (Triton draining after SIGTERM).
    not_ready: set[str] = field(default_factory=set)
    #: Addresses whose infer calls fail UNAVAILABLE (a replica gone mid-call).
    gone: set[str] = field(default_factory=set)

    def identity_at(self, url: str) -> dict[str, ServedIdentity | None]:
        return self.per_address.get(url, self.identity)

    def config(self, name: str, url: str = "") -> dict[str, Any]:
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
        identity = self.identity_at(url)[name]
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
        return self.url not in self.server.not_ready

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
        return {"config": self.server.config(name, self.url)}

    async def infer(self, model_name: str, inputs: list[Any], **kwargs: Any) -> _FakeResult:
        self.calls.append("infer")
        rows = inputs[0]._get_content()  # what the backend sent
        shape = inputs[0].shape()
        array = np.frombuffer(rows, dtype=np.int64 if len(shape) == 2 else np.uint8)
        array = array.reshape(shape)
        if self.server.hangs(array):
            await asyncio.sleep(kwargs.get("client_timeout") or 0)
            raise _deadline_error()
        if self.url in self.server.gone:
            raise InferenceServerException(msg="Socket closed", status="StatusCode.UNAVAILABLE")
        self.server.during_infer()
        identity = self.server.identity_at(self.url)[model_name]
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


def _backend(url: str, **kwargs: Any) -> TritonBackend:
    """A backend on `url` that expects model X (not started)."""
    return TritonBackend(
        url=url,
        default_timeout_s=5.0,
        max_batch_size=8,
        expected_model_id=X.model_id,
        expected_weights_sha256=X.weights_sha256,
        **kwargs,
    )


@pytest.fixture
async def fake_backend(fake_triton: FakeTriton) -> AsyncIterator[TritonBackend]:
    backend = _backend("triton:8001", metrics=Metrics())
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
    backend = _backend("triton:8001")
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
        _channel(fake_backend).epoch += 1

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


def _channel(backend: TritonBackend, address: str = "triton:8001") -> Any:
    """The channel of the replica at `address`."""
    channel = backend._replicas[address].channel
    assert channel is not None
    return channel


async def _probes_done(backend: TritonBackend) -> None:
    channel = _channel(backend)
    if channel.probe is not None:
        await asyncio.gather(channel.probe, return_exceptions=True)


async def test_a_deadline_on_a_channel_that_stopped_answering_makes_it_stale(
    fake_triton: FakeTriton, fake_backend: TritonBackend
) -> None:
    fake_triton.hangs = lambda rows: True
    fake_triton.live_hangs = True
    first = _channel(fake_backend)
    with pytest.raises(DeadlineExceeded):
        await fake_backend.embed_texts(TOKENS, timeout_s=0.05)
    await _probes_done(fake_backend)
    assert fake_triton.live_calls == 1
    assert first is not None and first.stale
    # The next call reconnects: a new client, which checks the identity again.
    fake_triton.hangs = lambda rows: False
    assert (await fake_backend.embed_texts(TOKENS))[0, 0] == 1.0
    assert len(fake_triton.clients) == 2
    assert _channel(fake_backend) is not first


async def test_a_slow_call_on_a_channel_that_still_answers_keeps_it(
    fake_triton: FakeTriton, fake_backend: TritonBackend
) -> None:
    fake_triton.hangs = lambda rows: True  # this call is slow, the server is fine
    first = _channel(fake_backend)
    with pytest.raises(DeadlineExceeded):
        await fake_backend.embed_texts(TOKENS, timeout_s=0.05)
    await _probes_done(fake_backend)
    assert fake_triton.live_calls == 1  # one cheap liveness call, answered
    assert first is not None and not first.stale
    fake_triton.hangs = lambda rows: False
    await fake_backend.embed_texts(TOKENS)
    assert _channel(fake_backend) is first and len(fake_triton.clients) == 1


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
    assert not _channel(fake_backend).stale
    assert len(fake_triton.clients) == 1


async def test_a_deadline_on_a_replaced_channel_leaves_the_new_one_alone(
    fake_triton: FakeTriton, fake_backend: TritonBackend
) -> None:
    old = _channel(fake_backend)
    replica = fake_backend._replicas["triton:8001"]
    started = time.monotonic()
    old.stale = True
    new = fake_backend._channel_of(replica)
    assert new is not old
    fake_triton.live_hangs = True
    fake_backend._deadline_passed(replica, old, started)  # no longer the channel calls use
    await _probes_done(fake_backend)
    assert fake_triton.live_calls == 0
    assert not new.stale


# ====================================================================== replicas
A, B, C = "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"
REPLICAS = f"ipv4:{A},{B}"
PROBE_CALLS = {"is_server_ready", "is_model_ready", "get_model_config"}


def _client(server: FakeTriton, address: str) -> FakeClient:
    """The newest fake client of `address`."""
    return [c for c in server.clients if c.url == address][-1]


def _infers(server: FakeTriton, address: str) -> int:
    return sum(c.calls.count("infer") for c in server.clients if c.url == address)


@pytest.fixture
async def replica_backend(fake_triton: FakeTriton) -> AsyncIterator[TritonBackend]:
    backend = _backend(REPLICAS)
    await backend.start()
    yield backend
    await backend.aclose()


@pytest.mark.parametrize(
    ("url", "addresses", "dns"),
    [
        ("triton:8001", ("triton:8001",), None),
        (f"ipv4:{A},{B}", (A, B), None),
        ("ipv6:[::1]:8001,[::2]:8001", ("[::1]:8001", "[::2]:8001"), None),
        ("dns:///triton-headless:8001", (), ("triton-headless", 8001)),
        ("dns:triton-headless:9001", (), ("triton-headless", 9001)),
        ("dns://10.0.0.53/triton-headless", (), ("triton-headless", 443)),
    ],
)
def test_the_target_names_the_replicas(
    url: str, addresses: tuple[str, ...], dns: tuple[str, int] | None
) -> None:
    assert Target.parse(url) == Target(addresses=addresses, dns=dns)


async def test_a_single_address_keeps_one_channel_for_calls_and_probes(
    fake_triton: FakeTriton, fake_backend: TritonBackend
) -> None:
    for _ in range(3):
        assert (await fake_backend.embed_texts(TOKENS))[0, 0] == 1.0
        assert await fake_backend.ready()
    assert len(fake_triton.clients) == 1
    (client,) = fake_triton.clients
    assert set(client.calls) == PROBE_CALLS | {"infer"}
    assert "grpc.lb_policy_name" not in dict(client.channel_args)  # one address per channel


async def test_each_replica_has_its_own_channel_and_probes_do_not_move_the_rotation(
    fake_triton: FakeTriton, replica_backend: TritonBackend
) -> None:
    """The rotation moves only when a call is placed: probes between sequential calls
    (each reads five things from every replica) cannot pin the calls to one replica."""
    for _ in range(6):
        assert (await replica_backend.embed_texts(TOKENS))[0, 0] == 1.0
        assert await replica_backend.ready()
    assert sorted(c.url for c in fake_triton.clients) == [A, B]
    for client in fake_triton.clients:
        assert "grpc.lb_policy_name" not in dict(client.channel_args)
        assert set(client.calls) == PROBE_CALLS | {"infer"}
        assert client.calls.count("infer") == 3
        # Checked at start() and by each probe, on the channel inference uses.
        assert client.calls.count("get_model_config") == 2 * (1 + 6)


async def test_no_inference_reaches_a_replica_that_serves_another_model(
    fake_triton: FakeTriton,
) -> None:
    fake_triton.per_address[C] = {IMAGE_MODEL: Y, TEXT_MODEL: Y}
    metrics = Metrics()
    backend = _backend(f"ipv4:{A},{B},{C}", metrics=metrics)
    await backend.start()
    try:
        for _ in range(30):
            assert (await backend.embed_texts(TOKENS))[0, 0] == 1.0  # never Y's
            assert await backend.ready()  # two of three serve: ready
        assert backend.replica_states() == {A: "serving", B: "serving", C: "mismatch"}
        assert sample(metrics.registry, "clip_model_mismatch") == 1  # said, loudly
    finally:
        await backend.aclose()
    assert _infers(fake_triton, C) == 0
    assert _infers(fake_triton, A) == _infers(fake_triton, B) == 15


async def test_only_foreign_replicas_left_is_a_mismatch(fake_triton: FakeTriton) -> None:
    fake_triton.per_address[A] = fake_triton.per_address[B] = {IMAGE_MODEL: Y, TEXT_MODEL: Y}
    backend = _backend(REPLICAS)
    await backend.start()
    try:
        assert not await backend.ready()
        with pytest.raises(ModelMismatch, match=Y.model_id or ""):
            await backend.embed_texts(TOKENS)
    finally:
        await backend.aclose()
    assert _infers(fake_triton, A) == _infers(fake_triton, B) == 0


async def test_a_replica_that_changes_its_model_is_taken_out_before_its_next_vector(
    fake_triton: FakeTriton, replica_backend: TritonBackend
) -> None:
    for _ in range(4):
        assert (await replica_backend.embed_texts(TOKENS))[0, 0] == 1.0

    def b_restarts_as_y() -> None:
        # Inside a call: B reconnects (a restart) and now serves Y.
        if fake_triton.per_address.get(B) is None:
            fake_triton.per_address[B] = {IMAGE_MODEL: Y, TEXT_MODEL: Y}
            _channel(replica_backend, B).epoch += 1

    fake_triton.during_infer = b_restarts_as_y
    for _ in range(10):
        assert (await replica_backend.embed_texts(TOKENS))[0, 0] == 1.0
    assert replica_backend.replica_states()[B] == "mismatch"


async def test_a_new_dns_address_gets_no_call_before_its_model_is_checked(
    fake_triton: FakeTriton, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A headless Service's addresses change with scale-ups; each refresh interval (0 s
    here) the name is looked up again: a new address starts unverified, and a removed
    one's channel is closed."""
    answers = {"now": [A, B]}

    async def lookup(host: str, port: int) -> list[str]:
        assert (host, port) == ("triton-headless", 8001)
        return list(answers["now"])

    monkeypatch.setattr(triton_module, "_lookup", lookup)
    monkeypatch.setattr(triton_module, "_DNS_REFRESH_S", 0.0)
    fake_triton.per_address[C] = {IMAGE_MODEL: Y, TEXT_MODEL: Y}
    backend = _backend("dns:///triton-headless:8001")
    await backend.start()
    try:
        assert set(backend.replica_states()) == {A, B}
        answers["now"] = [B, C]  # A scaled away, C (another model) joins
        for _ in range(10):
            assert (await backend.embed_texts(TOKENS))[0, 0] == 1.0
            await asyncio.sleep(0)
        assert set(backend.replica_states()) == {B, C}
        assert backend.replica_states()[C] == "mismatch"
        assert "close" in _client(fake_triton, A).calls
        c_calls = _client(fake_triton, C).calls
        assert "get_model_config" in c_calls and "infer" not in c_calls
    finally:
        await backend.aclose()


async def test_a_draining_replica_gets_no_new_calls(
    fake_triton: FakeTriton, replica_backend: TritonBackend
) -> None:
    fake_triton.not_ready.add(A)  # SIGTERM: Triton's readiness turns false
    assert await replica_backend.ready()  # B still serves
    before = _infers(fake_triton, A)
    for _ in range(6):
        assert (await replica_backend.embed_texts(TOKENS))[0, 0] == 1.0
    assert _infers(fake_triton, A) == before
    assert replica_backend.replica_states()[A] == "out"
    fake_triton.not_ready.clear()  # back (a restart, or a drain called off)
    assert await replica_backend.ready()
    for _ in range(6):
        await replica_backend.embed_texts(TOKENS)
    assert _infers(fake_triton, A) == before + 3


async def test_a_call_whose_replica_is_gone_is_answered_by_another(
    fake_triton: FakeTriton, replica_backend: TritonBackend
) -> None:
    fake_triton.gone.add(A)
    for _ in range(4):  # each call that lands on A is retried on B at once
        assert (await replica_backend.embed_texts(TOKENS))[0, 0] == 1.0
    assert _infers(fake_triton, A) >= 1  # A was tried, and failed: nobody saw it
    assert _infers(fake_triton, B) >= 4


async def test_without_the_retry_on_another_replica_the_caller_sees_the_gone_one(
    fake_triton: FakeTriton, replica_backend: TritonBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above shows something: with one attempt, a call on A fails."""
    monkeypatch.setattr(triton_module, "_UNAVAILABLE_ATTEMPTS", 1)
    fake_triton.gone.add(A)
    outcomes = await asyncio.gather(
        *(replica_backend.embed_texts(TOKENS) for _ in range(2)), return_exceptions=True
    )
    assert any(isinstance(o, BackendUnavailable) for o in outcomes), outcomes


async def test_the_channel_of_a_replica_is_renewed_when_stale_and_closed_with_the_backend(
    fake_triton: FakeTriton, replica_backend: TritonBackend
) -> None:
    assert await replica_backend.ready()
    a = _channel(replica_backend, A)
    a.stale = True
    assert await replica_backend.ready()
    assert _channel(replica_backend, A) is not a
    assert len(fake_triton.clients) == 3
    await replica_backend.aclose()
    assert all("close" in client.calls for client in fake_triton.clients)
