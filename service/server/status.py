"""The one table from service errors to what callers see: a gRPC code and, for the
HTTP API, an HTTP status and an OpenAI-style error `type` (the same row for both)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import grpc

from service.errors import (
    AnswerTooLarge,
    BackendFailure,
    BackendUnavailable,
    ClipError,
    DeadlineExceeded,
    InvalidInput,
    ItemNotFound,
    MethodNotAllowed,
    ModelMismatch,
    ModelNotFound,
    NotConfigured,
    Overloaded,
    RequestTimeout,
    RequestTooLarge,
    RouteNotFound,
    Unauthenticated,
)

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """How one kind of error reaches a caller, over either transport."""

    code: grpc.StatusCode
    http_status: int
    #: OpenAI's `error.type` (the classes its clients raise follow `http_status`).
    http_type: str


_INTERNAL = Outcome(grpc.StatusCode.INTERNAL, 500, "server_error")
_TABLE: dict[type[ClipError], Outcome] = {
    InvalidInput: Outcome(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    Unauthenticated: Outcome(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    ModelNotFound: Outcome(grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    ItemNotFound: Outcome(grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    # 429 for every RESOURCE_EXHAUSTED: "too much now, retry later or send less".
    Overloaded: Outcome(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    RequestTooLarge: Outcome(grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "invalid_request_error"),
    # Not "retry later" but "ask for less": the answer cannot fit whenever it is asked.
    AnswerTooLarge: Outcome(grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "invalid_request_error"),
    # The three below exist on the HTTP door only (gRPC has its own framing and routing).
    RequestTimeout: Outcome(grpc.StatusCode.DEADLINE_EXCEEDED, 408, "invalid_request_error"),
    RouteNotFound: Outcome(grpc.StatusCode.UNIMPLEMENTED, 404, "not_found_error"),
    MethodNotAllowed: Outcome(grpc.StatusCode.UNIMPLEMENTED, 405, "invalid_request_error"),
    BackendUnavailable: Outcome(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    ModelMismatch: Outcome(grpc.StatusCode.FAILED_PRECONDITION, 503, "service_unavailable"),
    DeadlineExceeded: Outcome(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
    BackendFailure: _INTERNAL,
    NotConfigured: Outcome(grpc.StatusCode.UNIMPLEMENTED, 501, "not_implemented_error"),
}


def outcome_for(error: BaseException) -> Outcome:
    """The row for `error`, looked up through its class hierarchy (INTERNAL otherwise)."""
    for kind in type(error).__mro__:
        if kind in _TABLE:
            return _TABLE[kind]
    return _INTERNAL


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC code a caller sees for `error` (INTERNAL for anything unexpected)."""
    return outcome_for(error).code


def caller_message(error: BaseException) -> str:
    """What a caller is told about `error`; what it must not see is logged here instead.

    A service error's message is written for the caller, except a BackendFailure's, which
    quotes the backend (a failing Triton python model sends its traceback, with paths).
    Anything unexpected is logged with its traceback and named only by its type.
    """
    if isinstance(error, BackendFailure):
        _LOGGER.warning("backend failure: %s", error)
        return f"{error.source} failed; the details are in the gateway's log"
    if isinstance(error, ClipError):
        return str(error)
    _LOGGER.error("unexpected error", exc_info=error)
    return f"internal error ({type(error).__name__}); the failure was logged"


#: Trailing metadata grpc's own retry policy reads (gRFC A6), and so does our client.
PUSHBACK_KEY = "grpc-retry-pushback-ms"


def retry_after_s(error: BaseException) -> float | None:
    """Seconds a refused caller should wait before trying the same request again; None
    when waiting will not help (bad input, too large) or the error is not a refusal."""
    hint = getattr(error, "retry_after_s", None)
    return hint if isinstance(error, ClipError) and isinstance(hint, int | float) else None


def grpc_retry_metadata(error: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata telling a gRPC caller when to retry (none without a hint)."""
    hint = retry_after_s(error)
    return () if hint is None else ((PUSHBACK_KEY, str(max(1, round(hint * 1000)))),)


def http_retry_headers(error: BaseException) -> dict[str, str]:
    """`Retry-After` (whole seconds, RFC 9110) and `retry-after-ms` (read by OpenAI's
    clients before `Retry-After`) for a refusal with a hint; none otherwise."""
    hint = retry_after_s(error)
    if hint is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(hint))), "retry-after-ms": str(round(hint * 1000))}
