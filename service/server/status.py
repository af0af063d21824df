"""The one table from service errors to gRPC status codes."""

from __future__ import annotations

import grpc

from service.errors import (
    BackendFailure,
    BackendUnavailable,
    ClipError,
    DeadlineExceeded,
    InvalidInput,
    ModelMismatch,
    Overloaded,
)

_CODES: dict[type[ClipError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    ModelMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    BackendFailure: grpc.StatusCode.INTERNAL,
}


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC code a caller sees for `error` (INTERNAL for anything unexpected)."""
    for kind in type(error).__mro__:
        if kind in _CODES:
            return _CODES[kind]
    return grpc.StatusCode.INTERNAL
