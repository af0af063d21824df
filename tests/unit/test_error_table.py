"""One error table for both transports: each error's gRPC code and HTTP status together."""

from __future__ import annotations

import grpc
import pytest

from service.errors import (
    BackendFailure,
    BackendUnavailable,
    ClipError,
    DeadlineExceeded,
    InvalidInput,
    ModelMismatch,
    ModelNotFound,
    NotConfigured,
    Overloaded,
    RequestTooLarge,
    Unauthenticated,
)
from service.server.http import error_body
from service.server.status import outcome_for, status_for

ROWS = [
    (InvalidInput("bad"), grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (Unauthenticated("who"), grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    (ModelNotFound("x", ["clip"]), grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    (RequestTooLarge("big"), grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "invalid_request_error"),
    (Overloaded("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (BackendUnavailable("down"), grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    (ModelMismatch("other"), grpc.StatusCode.FAILED_PRECONDITION, 503, "service_unavailable"),
    (DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
    (BackendFailure("oops"), grpc.StatusCode.INTERNAL, 500, "server_error"),
    (NotConfigured("no"), grpc.StatusCode.UNIMPLEMENTED, 501, "not_implemented_error"),
    (ClipError("?"), grpc.StatusCode.INTERNAL, 500, "server_error"),
    (RuntimeError("bug"), grpc.StatusCode.INTERNAL, 500, "server_error"),
]


@pytest.mark.parametrize(("error", "code", "status", "kind"), ROWS)
def test_each_error_has_one_row_for_both_transports(
    error: BaseException, code: grpc.StatusCode, status: int, kind: str
) -> None:
    outcome = outcome_for(error)
    assert (outcome.code, outcome.http_status, outcome.http_type) == (code, status, kind)
    assert status_for(error) == code
    http_status, body = error_body(error)
    assert http_status == status
    assert body["error"]["type"] == kind and body["error"]["code"] == code.name


def test_subclasses_inherit_their_row() -> None:
    class Custom(InvalidInput):
        pass

    assert outcome_for(Custom("x")).http_status == 400


def test_messages_name_known_models_and_hide_internal_errors() -> None:
    _, body = error_body(ModelNotFound("big", ["clip", "small"]))
    assert body["error"]["message"] == "model 'big' is not served here; known models: clip, small"
    _, body = error_body(KeyError("secret-internal-detail"))
    assert "secret-internal-detail" not in body["error"]["message"]
    assert body["error"]["message"] == "internal error (KeyError); the failure was logged"
