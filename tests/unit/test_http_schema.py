"""The HTTP API's JSON parsing: what is accepted, what each refusal tells the caller, and
that a body is refused within its bounds before anything is built from it."""

from __future__ import annotations

import base64
import json
import re
import time
import tracemalloc
from typing import Any

import msgspec
import numpy as np
import pytest

from service.errors import InvalidInput
from service.server import http_schema
from service.server.http_schema import (
    JsonBounds,
    check_dimensions,
    check_json_shape,
    decode_image,
    encode_json,
    encode_vector,
    json_string_bytes,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
B64 = base64.b64encode(PNG).decode()
BOUNDS = JsonBounds.for_limits(max_items=256, max_labels=1000, max_templates=32)


def _body(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def parse_embeddings(body: Any) -> http_schema.EmbeddingsRequest:
    return http_schema.parse_embeddings(_body(body), BOUNDS)


def parse_classify(body: Any) -> http_schema.ClassifyRequest:
    return http_schema.parse_classify(_body(body), BOUNDS)


def parse_similarity(body: Any) -> http_schema.SimilarityRequest:
    return http_schema.parse_similarity(_body(body), BOUNDS)


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
        ({"input": [{"text": 5}]}, "input[0].text: expected `str | null`, got `int`; an input is"),
        ({"input": [{"image": B64, "text": "x"}]}, 'input[0]: an object input is {"text"'),
        ({"input": [{}]}, "not one with neither"),
        ({"input": [{"video": "x"}]}, "input[0]: object contains unknown field `video`"),
        ({"input": [None]}, "input[0]: expected `int | str | object | array`, got `null`"),
        ({"input": 5}, "input: expected `str | array`, got `int`"),
        ({"input": "x", "encoding_format": "int4"}, "encoding_format: must be one of float"),
        ({"input": "x", "dimensions": 0}, "dimensions: must be a positive integer"),
        ({"input": "x", "dimensions": True}, "dimensions: expected `int | null`, got `bool`"),
        ({"input": "x", "model": 3}, "model: expected `str | null`, got `int`"),
        ({"input": [[[1]]]}, "input[0][0]: expected `int`, got `array`"),
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
        ("", "input[3]: image is empty (0 bytes)"),
        ("ünï", "input[3]: the image is not valid base64"),
        # URL-safe base64 is checked as strictly: a stray character is not skipped (it
        # would shift every following bit, and pixels could keep their length).
        (urlsafe[:40] + "!" + urlsafe[40:], "input[3]: the image is not valid base64"),
        (urlsafe[:40] + "+" + urlsafe[40:], "input[3]: the image is not valid base64"),
    ]
    for value, message in cases:
        with pytest.raises(InvalidInput) as caught:
            decode_image(value, "input", 3)
        assert str(caught.value).startswith(message), caught.value
        assert caught.value.index == 3


def test_json_bodies_must_be_objects_and_say_where_they_break() -> None:
    assert parse_embeddings(b'{"input": "x"}').items == ["x"]
    with pytest.raises(InvalidInput, match="not valid JSON: JSON is malformed"):
        parse_embeddings(b'{"input": }')
    with pytest.raises(InvalidInput, match="must be a JSON object: expected `object`"):
        parse_embeddings(b"[1]")
    with pytest.raises(InvalidInput, match="not UTF-8 JSON"):
        parse_embeddings(b'{"input": "\xc3\x28"}')
    # A lone surrogate escape is not a character: refused (400), and told why.
    for body in (b'{"input": ["\\ud800"]}', b'{"queries": ["a\\udc00"]}'):
        with pytest.raises(InvalidInput, match="half of a surrogate pair"):
            parse_embeddings(body) if b"input" in body else parse_similarity(body)
    assert parse_embeddings(b'{"input": "\\ud83d\\ude00"}').items == ["\U0001f600"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"input": [' + b",".join([b"{}"] * 2_000_000) + b"]}", "more than 12608 JSON"),
        (b'{"input": [' + b",".join([b'"a"'] * 1_500_000) + b"]}", "more than 12608 JSON"),
        (b'{"input": "x", "user": ' + b"[" * 1_000_000 + b"]" * 1_000_000 + b"}", "deeper than 16"),
        (b'{"input": ' + b"[" * 100_000, "deeper than 16"),
        (b'{"input": "x", "user": {"a": ' * 50_000, "deeper than 16"),
        (b'"a"' * 2_000_000, "more than 12608 JSON"),
    ],
)
def test_huge_or_deep_bodies_are_refused_early_and_cheaply(body: bytes, says: str) -> None:
    """Issue 24: `{"input":[{},{},...]}` near --max-message-bytes took 1.7 GB and stalled the
    loop for 14 s; deep nesting was a RecursionError (500). Now: a 400 naming the limit,
    after a bounded number of tokens, with next to no memory."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InvalidInput, match=says):
            parse_embeddings(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # the token walk builds no values
    assert time.perf_counter() - started < 5.0  # milliseconds; 5 s only on a crowded machine


def test_the_bounds_leave_room_for_the_largest_valid_requests() -> None:
    labels = [f"label {i}" for i in range(1000)]
    templates = [f"t{i} {{}}" for i in range(32)]
    images = [B64] * 256
    classify = parse_classify({"images": images, "labels": labels, "templates": templates})
    assert len(classify.labels) == 1000 and len(classify.images) == 256
    objects = [{"type": "text", "text": "x"}] * 256
    assert len(parse_similarity({"queries": objects, "candidates": objects}).queries) == 256
    check_json_shape(b'{"a": ' * 16 + b"1" + b"}" * 16, BOUNDS)


def test_answers_encode_numpy_vectors_and_json_string_sizes_are_upper_bounds() -> None:
    vector = np.array([0.1, -3.0e-5], dtype=np.float32)
    decoded = msgspec.json.decode(encode_json({"embedding": vector}))
    assert decoded["embedding"] == vector.tolist()
    for text in ("plain", 'quo"te\\', "\x00\x1f ctrl", "ünï 🎉"):
        assert len(encode_json(text)) <= json_string_bytes(text)


def test_dimensions_only_where_the_model_has_them() -> None:
    check_dimensions(None, 512, "clip")
    check_dimensions(512, 512, "clip")
    with pytest.raises(InvalidInput, match="makes 512-dimensional vectors and cannot shorten"):
        check_dimensions(256, 512, "clip")


def test_vectors_as_floats_or_little_endian_float32_base64() -> None:
    vector = np.array([0.5, -1.25, 3.0e-8], dtype=np.float32)
    floats = msgspec.json.decode(encode_json(encode_vector(vector, "float")))
    assert floats == [0.5, -1.25, pytest.approx(3.0e-8)]
    packed = base64.b64decode(encode_vector(vector, "base64"))  # type: ignore[arg-type]
    assert packed == vector.astype("<f4").tobytes() and len(packed) == 12


def test_classify_and_similarity_bodies_are_the_proto_fields() -> None:
    classify = parse_classify(
        {"images": [B64], "labels": ["a", "b"], "templates": ["{}"], "top_k": 1, "model": "m"}
    )
    assert (classify.images, classify.labels, classify.templates) == ([PNG], ["a", "b"], ["{}"])
    assert (classify.top_k, classify.model) == (1, "m")
    assert parse_classify({}).labels == []  # empty: the scorer's own checks refuse it
    with pytest.raises(InvalidInput, match=r"labels\[1\]: expected `str`, got `int`"):
        parse_classify({"images": [B64], "labels": ["a", 2]})
    with pytest.raises(InvalidInput, match=re.escape("top_k: expected `int | null`, got `str`")):
        parse_classify({"top_k": "3"})
    with pytest.raises(InvalidInput, match=r"images\[0\]: the image is not valid base64"):
        parse_classify({"images": ["??"], "labels": ["a"]})
    similarity = parse_similarity({"queries": ["a", {"image": B64}], "candidates": [{"text": "b"}]})
    assert similarity.queries == ["a", PNG] and similarity.candidates == ["b"]
    with pytest.raises(InvalidInput, match=r"candidates\[0\]: object contains unknown field"):
        parse_similarity({"queries": ["a"], "candidates": [{"audio": "x"}]})


def test_every_body_takes_a_language_like_the_grpc_requests() -> None:
    assert parse_embeddings({"input": "x", "language": "fra_Latn"}).language == "fra_Latn"
    assert parse_classify({"language": "fra_Latn"}).language == "fra_Latn"
    assert parse_similarity({"language": "fra_Latn"}).language == "fra_Latn"
    # Unset, null or "": the model's default.
    for body in ({"input": "x"}, {"input": "x", "language": None}, {"input": "x", "language": ""}):
        assert parse_embeddings(body).language is None
    for parse in (parse_embeddings, parse_classify, parse_similarity):
        with pytest.raises(
            InvalidInput, match=re.escape("language: expected `str | null`, got `array`")
        ):
            parse({"language": ["fra_Latn"]})


def test_unknown_fields_are_refused_by_name() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_embeddings({"input": "x", "encoding_fromat": "base64"})
    assert caught.value.field == "encoding_fromat"
    assert str(caught.value) == (
        "encoding_fromat: unknown field; this route takes input, model, encoding_format, "
        "dimensions, user, language, priority, modality"
    )
    with pytest.raises(InvalidInput, match=r"^top_k: unknown field; this route takes queries"):
        parse_similarity({"queries": ["a"], "top_k": 3})


DATA_URI = f"data:image/png;base64,{B64}"


def test_images_in_the_forms_other_servers_take() -> None:
    # infinity: "modality": "image", each string a data: URI, base64 or an http(s) URL.
    parsed = parse_embeddings(
        {"modality": "image", "input": [DATA_URI, B64, " https://img.example.com/a.png "]}
    )
    assert parsed.items == [PNG, PNG, http_schema.ImageUrl("https://img.example.com/a.png")]
    assert parse_embeddings({"modality": "image", "input": DATA_URI}).items == [PNG]
    assert parse_embeddings({"modality": "text", "input": "a cat"}).items == ["a cat"]
    # OpenAI-style content parts, the object form and the string form of image_url.
    parts = parse_embeddings(
        {
            "input": [
                {"type": "text", "text": "a cat"},
                {"type": "image_url", "image_url": {"url": DATA_URI}},
                {"type": "image_url", "image_url": {"url": "http://h/x.jpg", "detail": "auto"}},
                {"image_url": DATA_URI},
            ]
        }
    )
    assert parts.items == ["a cat", PNG, http_schema.ImageUrl("http://h/x.jpg"), PNG]
    similarity = parse_similarity(
        {"queries": [{"type": "image_url", "image_url": {"url": DATA_URI}}], "candidates": ["x"]}
    )
    assert similarity.queries == [PNG]
    classify = parse_classify({"images": ["https://h/a.png", B64], "labels": ["a"]})
    assert classify.images == [http_schema.ImageUrl("https://h/a.png"), PNG]
    # Prose that merely starts with "data:" stays a text.
    assert parse_embeddings({"input": "data: the figures"}).items == ["data: the figures"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"input": DATA_URI},
            "input[0]: is a data: URI, which is not embedded as text; "
            'to send an image, set "modality": "image"',
        ),
        ({"input": ["a", "DATA:image/jpeg;base64,AAAA"]}, "input[1]: is a data: URI"),
        ({"input": [{"text": DATA_URI}]}, "input[0]: is a data: URI"),
        (
            {"modality": "image", "input": ["a red circle"]},
            "input[0]: is not an image: send a data:image",
        ),
        ({"modality": "image", "input": [DATA_URI, "ftp://h/x.png"]}, "input[1]: is not an image"),
        ({"modality": "video", "input": "x"}, "modality: must be text or image, not 'video'"),
        (
            {"input": [{"type": "image_url", "text": "x"}]},
            "input[0]: an object of type 'image_url' must hold 'image_url' alone",
        ),
        (
            {"input": [{"type": "image_url", "image_url": {"uri": "x"}}]},
            "object contains unknown field `uri`",
        ),
        ({"input": [1, 2]}, "check_embedding_ctx_length=False"),
        (
            {"input": [[1, 2]]},
            (
                "input[0]: token ids are not accepted: send texts (this model has its own "
                "tokenizer); LangChain's OpenAIEmbeddings sends token ids unless built with "
                "check_embedding_ctx_length=False"
            ),
        ),
    ],
)
def test_image_forms_refused_with_how_to_send_them(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_embeddings(body)
    assert message in str(caught.value)
