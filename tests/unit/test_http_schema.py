"""The HTTP API's JSON parsing: what is accepted, and what each refusal tells the caller."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from service.errors import InvalidInput
from service.server.http_schema import (
    check_dimensions,
    decode_image,
    encode_vector,
    parse_classify,
    parse_embeddings,
    parse_json,
    parse_similarity,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
B64 = base64.b64encode(PNG).decode()


def test_input_forms_of_openai_and_jina_are_accepted() -> None:
    assert parse_embeddings({"input": "a cat"}).items == ["a cat"]
    assert parse_embeddings({"input": ["a", ""]}).items == ["a", ""]
    mixed = parse_embeddings(
        {
            "model": "big",
            "input": ["a", {"text": "b"}, {"image": B64}, {"type": "text", "text": "c"}],
        }
    )
    assert mixed.items == ["a", "b", PNG, "c"]
    assert mixed.model == "big"
    parsed = parse_embeddings({"input": "x", "encoding_format": "base64", "dimensions": 64})
    assert (parsed.model, parsed.encoding_format, parsed.dimensions) == ("", "base64", 64)
    # OpenAI clients send nulls for unset fields.
    nulls = parse_embeddings({"input": "x", "model": None, "encoding_format": None})
    assert (nulls.model, nulls.encoding_format, nulls.dimensions) == ("", "float", None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "input: is required"),
        ({"input": []}, "input: is empty"),
        ({"input": [1, 2, 3]}, "input: token ids are not accepted"),
        ({"input": ["a", [1, 2]]}, "input[1]: token ids are not accepted"),
        ({"input": [{"text": 5}]}, 'input[0]: an object input is {"text"'),
        ({"input": [{"image": B64, "text": "x"}]}, "input[0]: an object input"),
        ({"input": [None]}, "input[0]: an input is a string or an object, not null"),
        ({"input": 5}, "input: must be a list, not a number"),
        ({"input": "x", "encoding_format": "int4"}, "encoding_format: must be one of float"),
        ({"input": "x", "dimensions": 0}, "dimensions: must be a positive integer"),
        ({"input": "x", "dimensions": True}, "dimensions: must be a positive integer"),
        ({"input": "x", "model": 3}, "model: must be a string, not a number"),
    ],
)
def test_bad_embedding_bodies_say_what_is_wrong(body: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_embeddings(body)
    assert message in str(caught.value)


def test_images_as_base64_in_every_common_spelling() -> None:
    urlsafe = base64.urlsafe_b64encode(PNG).decode().rstrip("=")
    wrapped = "\n".join(B64[i : i + 76] for i in range(0, len(B64), 76))
    for text in (B64, urlsafe, wrapped, f"data:image/png;base64,{B64}", f"  {B64}  "):
        assert decode_image(text, "input", 0) == PNG
    cases = [
        ("not base64!", "input[3]: the image is not valid base64"),
        ("data:image/png,rawbytes", "input[3]: a data: URI must be base64 encoded"),
        ("", "input[3]: the image is empty"),
        (12, "input[3]: an image is a base64 string or a data: URI, not a number"),
        ("ünï", "input[3]: the image is not valid base64"),
    ]
    for value, message in cases:
        with pytest.raises(InvalidInput) as caught:
            decode_image(value, "input", 3)
        assert str(caught.value).startswith(message), caught.value
        assert caught.value.index == 3


def test_json_bodies_must_be_objects_and_say_where_they_break() -> None:
    assert parse_json(b'{"input": "x"}') == {"input": "x"}
    with pytest.raises(InvalidInput, match="not valid JSON: Expecting value at line 1 column 11"):
        parse_json(b'{"input": }')
    with pytest.raises(InvalidInput, match="must be a JSON object, not a list"):
        parse_json(b"[1]")
    with pytest.raises(InvalidInput, match="not UTF-8 JSON"):
        parse_json(b'{"a": "\xc3\x28"}')


def test_dimensions_only_where_the_model_has_them() -> None:
    check_dimensions(None, 512, "clip")
    check_dimensions(512, 512, "clip")
    with pytest.raises(InvalidInput, match="makes 512-dimensional vectors and cannot shorten"):
        check_dimensions(256, 512, "clip")


def test_vectors_as_floats_or_little_endian_float32_base64() -> None:
    vector = np.array([0.5, -1.25, 3.0e-8], dtype=np.float32)
    assert encode_vector(vector, "float") == [0.5, -1.25, pytest.approx(3.0e-8)]
    packed = base64.b64decode(encode_vector(vector, "base64"))  # type: ignore[arg-type]
    assert packed == vector.astype("<f4").tobytes() and len(packed) == 12
    json.dumps(encode_vector(vector, "float"))  # plain floats, serializable


def test_classify_and_similarity_bodies_are_the_proto_fields() -> None:
    classify = parse_classify(
        {"images": [B64], "labels": ["a", "b"], "templates": ["{}"], "top_k": 1, "model": "m"}
    )
    assert (classify.images, classify.labels, classify.templates) == ([PNG], ["a", "b"], ["{}"])
    assert (classify.top_k, classify.model) == (1, "m")
    assert parse_classify({}).labels == []  # empty: the scorer's own checks refuse it
    with pytest.raises(InvalidInput, match=r"labels\[1\]: must be a string"):
        parse_classify({"images": [B64], "labels": ["a", 2]})
    with pytest.raises(InvalidInput, match="top_k: must be an integer"):
        parse_classify({"top_k": "3"})
    with pytest.raises(InvalidInput, match=r"images\[0\]: the image is not valid base64"):
        parse_classify({"images": ["??"], "labels": ["a"]})
    similarity = parse_similarity({"queries": ["a", {"image": B64}], "candidates": [{"text": "b"}]})
    assert similarity.queries == ["a", PNG] and similarity.candidates == ["b"]
    with pytest.raises(InvalidInput, match=r"candidates\[0\]: an object input"):
        parse_similarity({"queries": ["a"], "candidates": [{"audio": "x"}]})


def test_every_body_takes_a_language_like_the_grpc_requests() -> None:
    assert parse_embeddings({"input": "x", "language": "fra_Latn"}).language == "fra_Latn"
    assert parse_classify({"language": "fra_Latn"}).language == "fra_Latn"
    assert parse_similarity({"language": "fra_Latn"}).language == "fra_Latn"
    # Unset, null or "": the model's default.
    for body in ({"input": "x"}, {"input": "x", "language": None}, {"input": "x", "language": ""}):
        assert parse_embeddings(body).language is None
    for parse in (parse_embeddings, parse_classify, parse_similarity):
        with pytest.raises(InvalidInput, match="language: must be a language code string"):
            parse({"input": "x", "language": ["fra_Latn"]})
