"""Catalog filters become engine expressions only from what can be written safely."""

from __future__ import annotations

import pytest

from service.backends.vector_store import filter_expression
from service.errors import InvalidInput


def test_equality_membership_and_types_are_written_as_literals() -> None:
    expression = filter_expression(
        {"colour": "red", "size": ["S", "M"], "n": 3, "ok": True, "w": 0.5}
    )
    assert expression == (
        'metadata["colour"] == "red" and metadata["size"] in ["S", "M"] and '
        'metadata["n"] == 3 and metadata["ok"] == true and metadata["w"] == 0.5'
    )


@pytest.mark.parametrize(
    "conditions",
    [
        {'x"] or true or metadata["y': 1},  # a key that would close the expression
        {"colour": 'red" or true or "'},  # a value that would close the string
        {"colour": "back\\slash"},
        {"colour": "line\nbreak"},
        {"n": float("nan")},
        {"n": {"nested": 1}},
        {"n": []},
        {"n": [None]},
        {f"k{i}": i for i in range(17)},
    ],
)
def test_what_could_change_the_expression_is_refused(conditions: dict[str, object]) -> None:
    with pytest.raises(InvalidInput) as caught:
        filter_expression(conditions)
    assert caught.value.field == "filter"
