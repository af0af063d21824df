"""Retry hints: derived from how fast the queue drains, carried per transport, honoured
by the client with jitter inside its timeout."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from service.client import RetryPolicy, _Retries, pushback_s
from service.core.admission import MAX_RETRY_AFTER_S, MIN_RETRY_AFTER_S, Admission, DrainRate
from service.errors import (
    DEFAULT_RETRY_AFTER_S,
    BackendUnavailable,
    InvalidInput,
    Overloaded,
    RequestTooLarge,
)
from service.metrics import Metrics
from service.server.status import grpc_retry_metadata, http_retry_headers, retry_after_s


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_hint_is_the_backlog_over_the_recent_drain_rate() -> None:
    clock = _Clock()
    drain = DrainRate(window_s=10.0, clock=clock)
    assert drain.wait_for(10) == DEFAULT_RETRY_AFTER_S  # nothing answered yet: no rate
    for _ in range(10):  # 20 items a second for 5 s
        clock.now += 0.5
        drain.record(10)
    assert drain.per_second() == pytest.approx(100 / 4.5)
    assert drain.wait_for(45) == pytest.approx(45 / (100 / 4.5))
    assert drain.wait_for(0) == MIN_RETRY_AFTER_S
    assert drain.wait_for(10**6) == MAX_RETRY_AFTER_S
    clock.now += 30  # nothing answered for longer than the window: the rate is unknown
    assert drain.per_second() is None and drain.wait_for(45) == DEFAULT_RETRY_AFTER_S


def test_admission_refusals_carry_the_hint_and_only_answers_drain() -> None:
    clock = _Clock()
    admission = Admission(10, Metrics(), DrainRate(clock=clock))
    admission.admit(10)
    clock.now += 1.0
    admission.release(4, answered=False)  # failed work is not throughput
    assert admission.drain.per_second() is None
    admission.admit(4)
    clock.now += 1.0
    admission.release(5)
    admission.admit(5)
    with pytest.raises(Overloaded) as busy:
        admission.admit(5)  # 5 must be answered first, at 5 per 0.1 s (one record)
    assert busy.value.retry_after_s == pytest.approx(5 / (5 / MIN_RETRY_AFTER_S))
    with pytest.raises(Overloaded) as never:
        admission.admit(11)
    assert never.value.retry_after_s is None and "split the request" in str(never.value)


def test_hints_per_transport_only_for_refusals_worth_retrying() -> None:
    busy = Overloaded("busy", retry_after_s=2.4)
    assert retry_after_s(busy) == 2.4
    assert grpc_retry_metadata(busy) == (("grpc-retry-pushback-ms", "2400"),)
    assert http_retry_headers(busy) == {"Retry-After": "3", "retry-after-ms": "2400"}
    assert http_retry_headers(Overloaded("busy", retry_after_s=0.1))["Retry-After"] == "1"
    assert retry_after_s(BackendUnavailable("down")) == DEFAULT_RETRY_AFTER_S
    for never in (RequestTooLarge("big"), InvalidInput("bad"), ValueError("bug")):
        assert grpc_retry_metadata(never) == () and http_retry_headers(never) == {}


class _Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, trailers: tuple[tuple[str, str], ...]) -> None:
        self._code, self._trailers = code, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self) -> Any:
        return self._trailers


def test_the_client_waits_the_hint_with_jitter_within_its_timeout() -> None:
    hinted = _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, (("grpc-retry-pushback-ms", "200"),))
    assert pushback_s(hinted) == 0.2
    assert pushback_s(_Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, ())) is None
    assert (
        pushback_s(_Refusal(grpc.StatusCode.INVALID_ARGUMENT, hinted.trailing_metadata())) is None
    )
    refuse = (("grpc-retry-pushback-ms", "-1"),)  # gRFC A6: negative means do not retry
    assert pushback_s(_Refusal(grpc.StatusCode.UNAVAILABLE, refuse)) is None

    waits = []
    for _ in range(200):
        retries = _Retries(RetryPolicy(max_attempts=5, jitter=0.5), timeout_s=60.0)
        retries.timeout()
        waits.append(retries.wait_after(hinted))
    assert all(w is not None and 0.2 <= w <= 0.3 for w in waits)
    assert len(set(waits)) > 100  # spread: refused callers do not come back in step

    retries = _Retries(RetryPolicy(max_attempts=2), timeout_s=60.0)
    retries.timeout()
    assert retries.wait_after(hinted) is not None
    retries.timeout()
    assert retries.wait_after(hinted) is None  # attempts used up
    short = _Retries(RetryPolicy(), timeout_s=0.25)
    assert 0 < (short.timeout() or 0) <= 0.25
    assert short.wait_after(hinted) is None  # the wait would pass the deadline
