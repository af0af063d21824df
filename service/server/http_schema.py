"""The HTTP API's JSON, parsed and checked: bodies → plain values, vectors → JSON.

Pure functions (no transport): every refusal is an `InvalidInput` naming the field
and what to send instead, so the error table answers it as 400 like any bad input.

`POST /v1/embeddings` follows OpenAI's request (`model`, `input`, `encoding_format`,
`dimensions`, `user`); `input` is a string, a list of strings, or a list of objects
`{"text": ...}` / `{"image": <base64 or data: URI>}` (Jina's multimodal convention) /
`{"pixels": <base64 of the model's S×S RGB uint8 pixels>}`, which may mix. Every body
may name a `language` for towers that take one (NLLB), as the gRPC requests do.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core import vector_formats
from service.core.image_preprocess import PresizedPixels
from service.errors import InvalidInput

#: One input: a text, the bytes of an encoded image, or pre-sized pixels.
Item = str | bytes | PresizedPixels
#: OpenAI's two, then the compact ones (integers in the JSON list; `vector_formats`).
ENCODING_FORMATS = ("float", "base64", "int8", "uint8", "binary", "ubinary")


@dataclass(frozen=True)
class EmbeddingsRequest:
    """A parsed `POST /v1/embeddings` body."""

    model: str
    items: list[Item]
    encoding_format: str
    dimensions: int | None
    language: str | None = None


@dataclass(frozen=True)
class ClassifyRequest:
    """A parsed `POST /v1/classify` body (the fields of `ClassifyRequest` in the proto)."""

    model: str
    images: list[bytes | PresizedPixels]
    labels: list[str]
    templates: list[str]
    top_k: int
    language: str | None = None


@dataclass(frozen=True)
class SimilarityRequest:
    """A parsed `POST /v1/similarity` body (the fields of `SimilarityRequest`)."""

    model: str
    queries: list[Item]
    candidates: list[Item]
    language: str | None = None


def parse_json(body: bytes) -> dict[str, Any]:
    """A request body → its JSON object; InvalidInput saying where the JSON breaks."""
    try:
        value = json.loads(body)
    except UnicodeDecodeError:
        raise InvalidInput("the request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
            f"{exc.colno}; send a JSON object with Content-Type: application/json"
        ) from None
    if not isinstance(value, dict):
        raise InvalidInput(f"the request body must be a JSON object, not {_kind(value)}")
    return value


def decode_image(value: Any, field: str, index: int | None = None) -> bytes:
    """Base64 (standard or URL-safe, padding optional) or a `data:<type>;base64,` URI → bytes."""
    if not isinstance(value, str):
        raise InvalidInput(
            f"an image is a base64 string or a data: URI, not {_kind(value)}",
            field=field,
            index=index,
        )
    text = value.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidInput(
                "a data: URI must be base64 encoded (data:image/png;base64,...)",
                field=field,
                index=index,
            )
    text = "".join(text.split())  # line-wrapped base64 is common
    text += "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            data = base64.urlsafe_b64decode(text.encode("ascii"))
        else:
            data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidInput(
            "the image is not valid base64 (send the file's bytes base64 encoded, or a "
            "data:image/...;base64, URI)",
            field=field,
            index=index,
        ) from None
    if not data:
        raise InvalidInput("the image is empty", field=field, index=index)
    return data


def _item(value: Any, field: str, index: int) -> Item:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        keys = set(value) - {"type"}  # {"type": "text", "text": ...} is accepted too
        if keys == {"text"} and isinstance(value["text"], str):
            return str(value["text"])
        if keys == {"image"}:
            return decode_image(value["image"], field, index)
        if keys == {"pixels"}:
            return PresizedPixels(decode_image(value["pixels"], field, index))
        raise InvalidInput(
            'an object input is {"text": "..."}, {"image": "<base64 or data: URI>"} or '
            '{"pixels": "<base64 of S*S*3 RGB bytes>"}, '
            f"not one with the keys {sorted(value)}",
            field=field,
            index=index,
        )
    if isinstance(value, int | list):
        raise InvalidInput(
            "token ids are not accepted: send texts (this model has its own tokenizer)",
            field=field,
            index=index,
        )
    raise InvalidInput(
        f"an input is a string or an object, not {_kind(value)}", field=field, index=index
    )


def parse_items(value: Any, field: str) -> list[Item]:
    """A list of strings and/or `{"text"}` / `{"image"}` objects → texts and image bytes."""
    if not isinstance(value, list):
        raise InvalidInput(f"must be a list, not {_kind(value)}", field=field)
    return [_item(v, field, i) for i, v in enumerate(value)]


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model", "")
    if model is None:
        return ""
    if not isinstance(model, str):
        raise InvalidInput(f"must be a string, not {_kind(model)}", field="model")
    return model


def _language(body: Mapping[str, Any]) -> str | None:
    """The optional `language` (a code such as `fra_Latn`; null or "": the model's default)."""
    language = body.get("language")
    if language is None or language == "":
        return None
    if not isinstance(language, str):
        raise InvalidInput(
            f"must be a language code string such as 'fra_Latn', not {_kind(language)}",
            field="language",
        )
    return language


def parse_embeddings(body: Mapping[str, Any]) -> EmbeddingsRequest:
    """A `/v1/embeddings` body → what to embed and how to answer."""
    if "input" not in body:
        raise InvalidInput("is required (a string, or a list of strings or objects)", field="input")
    raw = body["input"]
    if isinstance(raw, str):
        items: list[Item] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(v, int) for v in raw):
        raise InvalidInput(
            "token ids are not accepted: send texts (this model has its own tokenizer)",
            field="input",
        )
    else:
        items = parse_items(raw, "input")
    if not items:
        raise InvalidInput("is empty: send at least one text or image", field="input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODING_FORMATS:
        raise InvalidInput(
            f"must be one of {', '.join(ENCODING_FORMATS)}, not {encoding!r}",
            field="encoding_format",
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise InvalidInput(f"must be a positive integer, not {dimensions!r}", field="dimensions")
    return EmbeddingsRequest(_model(body), items, str(encoding), dimensions, _language(body))


def _strings(body: Mapping[str, Any], field: str) -> list[str]:
    value = body.get(field) or []
    if not isinstance(value, list):
        raise InvalidInput(f"must be a list of strings, not {_kind(value)}", field=field)
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise InvalidInput(f"must be a string, not {_kind(v)}", field=field, index=i)
    return list(value)


def parse_classify(body: Mapping[str, Any]) -> ClassifyRequest:
    """A `/v1/classify` body: `images` (base64), `labels`, `templates`, `top_k`, `model`."""
    images_raw = body.get("images") or []
    if not isinstance(images_raw, list):
        raise InvalidInput(
            f"must be a list of base64 strings, not {_kind(images_raw)}", field="images"
        )
    # Or `pixels`: base64 of pre-sized pixels (the gRPC ClassifyRequest.pixels).
    pixels_raw = body.get("pixels") or []
    if not isinstance(pixels_raw, list) or (pixels_raw and images_raw):
        raise InvalidInput(
            "must be a list of base64 strings, sent instead of images (not with them)",
            field="pixels",
        )
    top_k = body.get("top_k") or 0
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise InvalidInput(f"must be an integer, not {top_k!r}", field="top_k")
    images: list[bytes | PresizedPixels] = [
        decode_image(v, "images", i) for i, v in enumerate(images_raw)
    ]
    images += [PresizedPixels(decode_image(v, "pixels", i)) for i, v in enumerate(pixels_raw)]
    return ClassifyRequest(
        model=_model(body),
        images=images,
        labels=_strings(body, "labels"),
        templates=_strings(body, "templates"),
        top_k=top_k,
        language=_language(body),
    )


def parse_similarity(body: Mapping[str, Any]) -> SimilarityRequest:
    """A `/v1/similarity` body: `queries` and `candidates` as items, `model`."""
    return SimilarityRequest(
        model=_model(body),
        queries=parse_items(body.get("queries") or [], "queries"),
        candidates=parse_items(body.get("candidates") or [], "candidates"),
        language=_language(body),
    )


def check_dimensions(dimensions: int | None, model_dim: int, model: str) -> None:
    """CLIP vectors cannot be shortened: `dimensions` may only repeat the model's own."""
    if dimensions is not None and dimensions != model_dim:
        raise InvalidInput(
            f"model {model!r} makes {model_dim}-dimensional vectors and cannot shorten them "
            f"(CLIP is not trained for truncation); leave dimensions out or send {model_dim}",
            field="dimensions",
        )


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | list[int] | str:
    """A vector as OpenAI answers it: a list of floats, or base64 of little-endian float32;
    the compact formats as a list of integers (`vector_formats.quantize`)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    if encoding_format in vector_formats.FORMATS:
        return vector_formats.quantize(vector, encoding_format).tolist()
    return np.asarray(vector, dtype=np.float32).tolist()


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")
