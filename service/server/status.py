"""The one table from service errors to gRPC status codes, and what a caller is told."""

from __future__ import annotations

import logging

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

_LOGGER = logging.getLogger(__name__)

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
