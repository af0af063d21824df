"""The Triton backend without a server: settings, error mapping, an unreachable address."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from service.backends import triton as triton_module
from service.backends.triton import TritonBackend
from service.core.admission import Admission
from service.errors import BackendFailure, BackendUnavailable, DeadlineExceeded, Overloaded
from service.metrics import Metrics
from service.settings import Settings
from service.wiring import build_backend

# A refused connection must not wait for the deadline: with a 60 s budget, the
# answer (BackendUnavailable, not DeadlineExceeded) comes in far less than half of it.
DEADLINE_S = 60.0


async def test_unreachable_triton_at_start_is_not_fatal() -> None:
    backend = TritonBackend(url="127.0.0.1:1", default_timeout_s=DEADLINE_S, max_batch_size=8)
    await backend.start()
    try:
        assert backend.max_batch_size == 8  # kept until configs can be read
        assert not await backend.ready()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):  # not DeadlineExceeded: it did not wait
            await backend.embed_texts(np.ones((1, 4), dtype=np.int64))
        assert time.monotonic() - started < DEADLINE_S / 2
    finally:
        await backend.aclose()


def test_wiring_gives_the_triton_backend_its_settings() -> None:
    settings = Settings(
        triton_url="10.0.0.5:9001",
        triton_image_model="img",
        triton_text_model="txt",
        triton_model_version="3",
        backend_timeout_s=7.5,
        max_batch_size=16,
    )
    admission = Admission(8, Metrics())
    batched = build_backend(settings.replace(backend="triton"), None, Metrics(), admission)  # type: ignore[arg-type]
    backend = batched.inner  # type: ignore[attr-defined]
    assert isinstance(backend, TritonBackend)
    assert backend.url == "10.0.0.5:9001"
    assert backend.model_version == "3"
    assert backend.default_timeout_s == 7.5
    assert backend.max_batch_size == 16
    assert (backend.image_model, backend.text_model) == ("img", "txt")


@pytest.mark.parametrize(
    ("status", "message", "error"),
    [
        (
            "StatusCode.UNAVAILABLE",
            "[request id: <id_unknown>] Exceeds maximum queue size",
            Overloaded,
        ),
        ("StatusCode.UNAVAILABLE", "Request timeout expired", Overloaded),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", DeadlineExceeded),
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", BackendUnavailable),
        ("StatusCode.UNAVAILABLE", "Socket closed", BackendUnavailable),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'clip_image'", BackendUnavailable),
        ("StatusCode.INVALID_ARGUMENT", "unexpected shape for input", BackendFailure),
        ("StatusCode.INTERNAL", "encoder failed: boom", BackendFailure),
    ],
)
def test_triton_errors_map_to_service_errors(
    status: str, message: str, error: type[Exception]
) -> None:
    backend = TritonBackend(url="127.0.0.1:1", default_timeout_s=1.0, max_batch_size=8)
    mapped = backend._map_error(
        backend._models["image"], InferenceServerException(msg=message, status=status)
    )
    assert type(mapped) is error
    assert "request id" not in str(mapped)


class _ResultStub:
    def __init__(self, rows: int) -> None:
        self._rows = rows

    def as_numpy(self, name: str) -> np.ndarray:
        return np.ones((self._rows, 4), dtype=np.float32) / 2


class _RecordingClient:
    """Stands in for `tritonclient.grpc.aio.InferenceServerClient`; records infer()."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, url: str, channel_args: Any = None, **_: Any) -> None:
        self.url = url

    async def get_model_config(self, name: str, version: str = "", **_: Any) -> dict[str, Any]:
        is_image = "image" in name
        return {
            "config": {
                "name": name,
                "max_batch_size": 8,
                "input": [{"name": "IN", "data_type": "TYPE_UINT8" if is_image else "TYPE_INT64"}],
                "output": [{"name": "OUT", "dims": ["4"]}],
            }
        }

    async def infer(self, model_name: str, inputs: list[Any], **kwargs: Any) -> _ResultStub:
        self.calls.append({"model": model_name, **kwargs})
        return _ResultStub(inputs[0].shape()[0])

    async def close(self) -> None:
        return None


async def test_each_triton_request_carries_the_callers_remaining_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the gRPC deadline (`client_timeout`, s) and Triton's queue timeout (`timeout`,
    µs): the caller's budget when given, the backend's default otherwise."""
    monkeypatch.setattr(triton_module.triton_aio, "InferenceServerClient", _RecordingClient)
    calls = _RecordingClient.calls = []
    backend = TritonBackend(url="triton:8001", default_timeout_s=30.0, max_batch_size=8)
    await backend.start()
    try:
        await backend.embed_texts(np.ones((1, 4), dtype=np.int64), timeout_s=2.5)
        await backend.embed_images(np.zeros((1, 3, 2, 2), dtype=np.uint8))
    finally:
        await backend.aclose()
    given, default = calls
    # The budget less what the call itself spent before sending (bounded by the budget:
    # these hold on any machine).
    assert 0 < given["client_timeout"] <= 2.5
    assert 0 < given["timeout"] <= 2_500_000
    assert given["timeout"] == max(1, int(given["client_timeout"] * 1e6))
    assert 2.5 < default["client_timeout"] <= 30.0
    assert default["timeout"] == max(1, int(default["client_timeout"] * 1e6))


async def test_each_triton_request_carries_the_batch_priority(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch's lane as Triton's priority level (set by the batching queue around the
    call); 0, the model's default, outside any batch."""
    from service.backends.base import CALL_PRIORITY

    monkeypatch.setattr(triton_module.triton_aio, "InferenceServerClient", _RecordingClient)
    calls = _RecordingClient.calls = []
    backend = TritonBackend(url="triton:8001", default_timeout_s=30.0, max_batch_size=8)
    await backend.start()
    try:
        await backend.embed_images(np.zeros((1, 3, 2, 2), dtype=np.uint8))
        token = CALL_PRIORITY.set(2)
        try:
            await backend.embed_images(np.zeros((1, 3, 2, 2), dtype=np.uint8))
        finally:
            CALL_PRIORITY.reset(token)
    finally:
        await backend.aclose()
    assert [call["priority"] for call in calls] == [0, 2]


async def test_each_triton_request_carries_the_running_span_as_traceparent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch's `backend` span goes to Triton as W3C `traceparent`; no header without
    a recording span (tracing off)."""
    from opentelemetry.sdk.trace import TracerProvider

    monkeypatch.setattr(triton_module.triton_aio, "InferenceServerClient", _RecordingClient)
    calls = _RecordingClient.calls = []
    backend = TritonBackend(url="triton:8001", default_timeout_s=30.0, max_batch_size=8)
    tracer = TracerProvider().get_tracer("test")
    await backend.start()
    try:
        await backend.embed_images(np.zeros((1, 3, 2, 2), dtype=np.uint8))
        with tracer.start_as_current_span("backend") as span:
            await backend.embed_images(np.zeros((1, 3, 2, 2), dtype=np.uint8))
    finally:
        await backend.aclose()
    untraced, traced = calls
    assert untraced["headers"] is None
    context = span.get_span_context()
    flags = int(context.trace_flags)
    expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"
    assert traced["headers"] == {"traceparent": expected}


def test_clipsvc_triton_turns_on_opentelemetry_tracing_only_with_a_url() -> None:
    from service.processes.triton_server import opentelemetry_args

    assert opentelemetry_args("") == []
    args = opentelemetry_args("http://collector:4318/v1/traces", rate=10)
    settings = args[1::2]
    assert args[0::2] == ["--trace-config"] * len(settings)
    assert settings == [
        "mode=opentelemetry",
        "rate=10",
        "level=TIMESTAMPS",
        "opentelemetry,url=http://collector:4318/v1/traces",
        "opentelemetry,resource=service.name=triton",
    ]
