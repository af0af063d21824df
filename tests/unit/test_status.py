"""The error table: which code and which words a caller gets for each error."""

from __future__ import annotations

import logging

import grpc
import pytest

from service.errors import BackendFailure, InvalidInput, Overloaded
from service.server.status import caller_message, status_for


def test_a_backend_failure_names_its_source_and_logs_the_backends_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    triton_words = 'Traceback (most recent call last):\n  File "/models/clip_image/1/model.py"'
    error = BackendFailure(
        f"Triton clip_image: INTERNAL: {triton_words}", source="Triton clip_image"
    )
    with caplog.at_level(logging.WARNING):
        told = caller_message(error)
    assert status_for(error) == grpc.StatusCode.INTERNAL
    assert told.startswith("Triton clip_image failed")
    assert "Traceback" not in told and "model.py" not in told
    assert "model.py" in caplog.text  # the operator still gets every word


def test_service_errors_speak_to_the_caller() -> None:
    assert caller_message(InvalidInput("too long", field="texts", index=3)) == (
        "texts[3]: too long"
    )
    assert caller_message(Overloaded("queue full")) == "queue full"


def test_an_unexpected_error_is_named_by_type_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        told = caller_message(KeyError("/secret/path"))
    assert status_for(KeyError()) == grpc.StatusCode.INTERNAL
    assert told == "internal error (KeyError); the failure was logged"
    assert "/secret/path" in caplog.text
