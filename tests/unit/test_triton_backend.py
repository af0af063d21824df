"""The Triton backend without a server: settings, error mapping, an unreachable address."""

from __future__ import annotations

import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from service.backends.triton import TritonBackend
from service.core.admission import Admission
from service.errors import BackendFailure, BackendUnavailable, DeadlineExceeded, Overloaded
from service.metrics import Metrics
from service.settings import Settings
from service.wiring import build_backend

FAST_FAIL_S = 2.0


async def test_unreachable_triton_at_start_is_not_fatal() -> None:
    backend = TritonBackend(url="127.0.0.1:1", default_timeout_s=5.0, max_batch_size=8)
    await backend.start()
    try:
        assert backend.max_batch_size == 8  # kept until configs can be read
        assert not await backend.ready()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await backend.embed_texts(np.ones((1, 4), dtype=np.int64))
        assert time.monotonic() - started < FAST_FAIL_S
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
