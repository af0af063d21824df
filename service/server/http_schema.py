"""The HTTP API's JSON: request bodies → plain values, bounded; vectors → JSON.

Pure functions (no transport, no event loop): every refusal is an `InvalidInput` naming
the field and what to send instead, so the error table answers it as 400 like any bad
input. Decoding is bounded in CPU, memory and depth before any value is built:

1. `check_json_shape` walks the body's tokens with one compiled regular expression (C
   speed per token, strings skipped whole) and stops at the first token past
   `JsonBounds.max_tokens` or the first nesting past `JsonBounds.max_depth`: a body of
   millions of `{}` or `[[[[...` is refused after a few thousand tokens, before any
   object exists. msgspec's own `max_length` is checked only once a whole array is
   built, and its nesting limit is Python's recursion limit.
2. msgspec decodes the body into the typed structs below, refusing a wrong shape at the
   first value that does not fit (its path named in the 400).

`POST /v1/embeddings` follows OpenAI's request (`model`, `input`, `encoding_format`,
`dimensions`, `user`); `input` is a string, a list of strings, or a list of objects
`{"text": ...}` / `{"image": <base64 or data: URI>}` (Jina's multimodal convention) /
`{"pixels": <base64 of the model's S×S RGB uint8 pixels>}`, which may mix. Every body
may name a `language` for towers that take one (NLLB), as the gRPC requests do. A field
the route does not know, at the top or in an input object, is refused by name (a
misspelt `encoding_fromat` would otherwise be silently ignored).

Images also come in the forms other servers take: infinity's top-level
`"modality": "image"` (each string in `input` a data: URI, base64 or an http(s) URL) and
OpenAI-style content parts `{"type": "image_url", "image_url": {"url": ...}}` (or
`"image_url": "..."`). Nothing is guessed: a string that is a data: URI is never embedded
as text (400 saying how to send it), and under `"modality": "image"` a string that is
none of the three is refused by index. A URL becomes an `ImageUrl`, fetched by the HTTP
door (`core/image_fetch.py`) only where `--image-url-allow` allows it.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import numpy as np

from service.core import vector_formats
from service.core.image_preprocess import PresizedPixels
from service.errors import InvalidInput

T = TypeVar("T")


@dataclass(frozen=True)
class ImageUrl:
    """An image named by an http(s) URL: the door fetches it (or refuses) before the call."""

    url: str


#: One input: a text, the bytes of an encoded image, or pre-sized pixels.
Item = str | bytes | PresizedPixels
#: An input as parsed: an item, or an image URL not fetched yet.
ParsedItem = Item | ImageUrl
#: Longest image URL taken (browsers and CDNs stop near 8 KiB).
MAX_URL_CHARS = 8192
#: A string that is a data: URI (`data:image/png;base64,...`, `data:,x`), never a text;
#: "data: the figures" (a space after the colon) is prose.
_DATA_URI = re.compile(r"\s*data:\S", re.IGNORECASE)
#: What plain base64 may hold (line breaks allowed, not spaces: "a red circle" is no image).
_BASE64ISH = re.compile(r"[A-Za-z0-9+/=_\-\r\n]+")
_HOW_TO_SEND_AN_IMAGE = (
    'to send an image, set "modality": "image", or send {"image": "<data: URI or base64>"}, '
    'or a content part {"type": "image_url", "image_url": {"url": "<data: URI or URL>"}}'
)
#: OpenAI's two, then the compact ones (integers in the JSON list; `vector_formats`).
ENCODING_FORMATS = ("float", "base64", "int8", "uint8", "binary", "ubinary")
#: Nesting a valid body never comes near: `{"input": [{"text": ...}]}` is 2 levels deep.
MAX_JSON_DEPTH = 16

# A JSON string (escapes included; possessive, so an unterminated one cannot backtrack),
# or one structural character. Numbers, literals, ':' and whitespace are not tokens.
_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[\[\]{},]')
_OPEN, _CLOSE, _COMMA = frozenset(b"[{"), frozenset(b"]}"), ord(",")
# A \uD800-\uDFFF escape: msgspec's message for a lone one does not say so.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class JsonBounds:
    """How much JSON one body may hold before it is refused unread."""

    #: Strings, list separators, arrays and objects in the whole body.
    max_tokens: int
    max_depth: int = MAX_JSON_DEPTH
    #: The limits `max_tokens` was derived from, as the refusal names them.
    limits: str = ""

    @classmethod
    def for_limits(cls, max_items: int, max_labels: int, max_templates: int) -> JsonBounds:
        """Room for the largest valid request (Classify with every limit full, or two item
        lists of `max_items` objects of up to 4 fields), with room to spare; far below what
        a body of `--max-message-bytes` could otherwise hold."""
        per_item = 8  # `{"type": "text", "text": "..."},`: 4 strings, 2 commas, 2 braces
        return cls(
            max_tokens=per_item * (2 * max_items + max_labels + max_templates) + 256,
            limits=(
                f"--max-items {max_items}, --max-labels {max_labels}, "
                f"--max-templates {max_templates}"
            ),
        )


def check_json_shape(body: bytes, bounds: JsonBounds) -> None:
    """Refuse (400) a body with more tokens or deeper nesting than `bounds` allow, after
    reading at most that many tokens. Says nothing about validity: msgspec does that."""
    depth = tokens = 0
    for match in _TOKENS.finditer(body):
        tokens += 1
        if tokens > bounds.max_tokens:
            raise InvalidInput(
                f"the request body holds more than {bounds.max_tokens} JSON strings, arrays, "
                f"objects and list elements, more than any valid request needs at the limits "
                f"({bounds.limits or '--max-items, --max-labels, --max-templates'}); "
                "split the request"
            )
        first = body[match.start()]
        if first in _OPEN:
            depth += 1
            if depth > bounds.max_depth:
                raise InvalidInput(
                    f"the request body nests arrays and objects deeper than "
                    f"{bounds.max_depth} levels; a valid request nests at most 3"
                )
        elif first in _CLOSE:
            depth -= 1


class _ImageUrlPart(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """OpenAI's `{"url": ..., "detail": ...}` of an `image_url` content part."""

    url: str
    detail: str | None = None


class _InputObject(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """`{"text": ...}`, `{"image": ...}`, `{"pixels": ...}` or `{"image_url": ...}`;
    `"type"` beside it must name the one given (OpenAI's content parts)."""

    text: str | None = None
    image: str | None = None
    pixels: str | None = None
    image_url: str | _ImageUrlPart | None = None
    type: str | None = None


#: One item as sent: ints and int lists are token ids, decoded only to be refused by name.
_RawItem = str | int | list[int] | _InputObject


class _EmbeddingsBody(msgspec.Struct, forbid_unknown_fields=True):
    input: str | list[_RawItem] | msgspec.UnsetType = msgspec.UNSET
    model: str | None = None
    encoding_format: str | None = None
    dimensions: int | None = None
    user: str | None = None
    language: str | None = None
    priority: str | None = None  # "interactive" | "bulk" (lanes.parse checks it)
    modality: str | None = None  # infinity's "text" (default) | "image"


class _ClassifyBody(msgspec.Struct, forbid_unknown_fields=True):
    images: list[str] | None = None
    pixels: list[str] | None = None  # base64 of pre-sized pixels (ClassifyRequest.pixels)
    labels: list[str] | None = None
    templates: list[str] | None = None
    top_k: int | None = None
    model: str | None = None
    language: str | None = None
    priority: str | None = None  # "interactive" | "bulk" (lanes.parse checks it)


class _SimilarityBody(msgspec.Struct, forbid_unknown_fields=True):
    queries: list[_RawItem] | None = None
    candidates: list[_RawItem] | None = None
    model: str | None = None
    language: str | None = None
    priority: str | None = None  # "interactive" | "bulk" (lanes.parse checks it)


_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {
    body: msgspec.json.Decoder(body) for body in (_EmbeddingsBody, _ClassifyBody, _SimilarityBody)
}
# What to send instead, by top-level field, appended to msgspec's "Expected ..." message.
_ITEM_HINT = (
    'an input is a string, {"text": "..."}, {"image": "<base64 or data: URI>"}, '
    '{"type": "image_url", "image_url": {"url": "<data: URI or http(s) URL>"}} or '
    '{"pixels": "<base64 of S*S*3 RGB bytes>"} (token ids are not accepted)'
)
#: Token ids refused, and the fix for the client that sends them by default.
_TOKEN_IDS = (
    "token ids are not accepted: send texts (this model has its own tokenizer); "
    "LangChain's OpenAIEmbeddings sends token ids unless built with "
    "check_embedding_ctx_length=False"
)
_HINTS = {
    "input": _ITEM_HINT,
    "queries": _ITEM_HINT,
    "candidates": _ITEM_HINT,
    "images": "a list of base64 strings, data: URIs or http(s) URLs",
    "labels": "a list of strings",
    "templates": "a list of strings, each with one {}",
    "top_k": "an integer (0 = all labels)",
    "dimensions": "a positive integer",
    "model": "a model name (GET /v1/models lists them)",
    "language": "a language code string such as 'fra_Latn'",
    "encoding_format": f"one of {', '.join(ENCODING_FORMATS)}",
    "modality": "text or image",
    "priority": "interactive or bulk",
}


@dataclass(frozen=True)
class EmbeddingsRequest:
    """A parsed `POST /v1/embeddings` body."""

    model: str
    items: list[ParsedItem]
    encoding_format: str
    dimensions: int | None
    language: str | None = None
    priority: str | None = None  # "interactive" | "bulk" (lanes.parse checks it)


@dataclass(frozen=True)
class ClassifyRequest:
    """A parsed `POST /v1/classify` body (the fields of `ClassifyRequest` in the proto)."""

    model: str
    images: list[bytes | PresizedPixels | ImageUrl]
    labels: list[str]
    templates: list[str]
    top_k: int
    language: str | None = None
    priority: str | None = None  # "interactive" | "bulk" (lanes.parse checks it)


@dataclass(frozen=True)
class SimilarityRequest:
    """A parsed `POST /v1/similarity` body (the fields of `SimilarityRequest`)."""

    model: str
    queries: list[ParsedItem]
    candidates: list[ParsedItem]
    language: str | None = None
    priority: str | None = None  # "interactive" | "bulk" (lanes.parse checks it)


def _decode(body: bytes, kind: type[Any], bounds: JsonBounds) -> Any:
    """`body` → a `kind` struct, bounded first; InvalidInput naming where it breaks."""
    check_json_shape(body, bounds)
    try:
        return _DECODERS[kind].decode(body)
    except msgspec.ValidationError as exc:
        raise _explain(str(exc), kind) from None
    except msgspec.DecodeError as exc:
        hint = ""
        if _SURROGATE_ESCAPE.search(body):
            hint = (
                "; a \\uD800-\\uDFFF escape must be half of a surrogate pair (a lone one is "
                "not a character)"
            )
        raise InvalidInput(
            f"the request body is not valid JSON: {exc}{hint}; send a JSON object with "
            "Content-Type: application/json"
        ) from None
    except UnicodeDecodeError:
        raise InvalidInput("the request body is not UTF-8 JSON") from None
    except RecursionError:  # defensive: check_json_shape already bounds the nesting
        raise InvalidInput("the request body nests too deeply") from None


_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(.*)`")


def _explain(message: str, kind: type[Any]) -> InvalidInput:
    """msgspec's "Expected `str`, got `int` - at `$.input[0]`" as our field-first 400."""
    reason, _, path = message.partition(" - at `$")
    path = path.rstrip("`").lstrip(".")
    reason = reason[:1].lower() + reason[1:]
    unknown = _UNKNOWN_FIELD.fullmatch(message.partition(" - at `$")[0])
    if unknown is not None and not path:
        known = ", ".join(kind.__struct_fields__)
        return InvalidInput(f"unknown field; this route takes {known}", field=unknown.group(1)[:64])
    if not path:
        if reason.startswith("expected `object`"):
            return InvalidInput(f"the request body must be a JSON object: {reason}")
        return InvalidInput(f"the request body: {reason}")
    top = re.split(r"[.\[]", path, maxsplit=1)[0]
    hint = _HINTS.get(top)
    return InvalidInput(f"{reason}; {hint}" if hint else reason, field=path)


_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


def decode_image(value: str, field: str, index: int | None = None) -> bytes:
    """Base64 (standard or URL-safe, padding optional) or a `data:<type>;base64,` URI → bytes."""
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
            # URL-safe; checked as strictly as the standard alphabet (urlsafe_b64decode
            # skips what is not in the alphabet), and never the two mixed.
            if "+" in text or "/" in text:
                raise ValueError("both base64 alphabets")
            text = text.translate(_URLSAFE_TO_STANDARD)
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidInput(
            "the image is not valid base64 (send the file's bytes base64 encoded, or a "
            "data:image/...;base64, URI)",
            field=field,
            index=index,
        ) from None
    if not data:
        raise InvalidInput("image is empty (0 bytes)", field=field, index=index)
    return data


def image_string(
    value: str, field: str, index: int | None, *, strict: bool = True
) -> bytes | ImageUrl:
    """A string that must be an image: an http(s) URL, a data: URI or plain base64;
    `strict`: a string with characters base64 never holds is refused as "not an image"
    (a text sent under "modality": "image") before base64 decoding is tried."""
    text = value.strip()
    if text[:8].lower().startswith(("http://", "https://")):
        if len(text) > MAX_URL_CHARS:
            raise InvalidInput(
                f"the image URL is {len(text)} characters, over {MAX_URL_CHARS}",
                field=field,
                index=index,
            )
        return ImageUrl(text)
    if strict and not text.lower().startswith("data:") and not _BASE64ISH.fullmatch(text):
        raise InvalidInput(
            "is not an image: send a data:image/...;base64, URI, the base64 of the image "
            'file, or an http(s) URL (texts go in a request without "modality": "image")',
            field=field,
            index=index,
        )
    return decode_image(value, field, index)


def text_input(value: str, field: str, index: int | None = None) -> str:
    """A string taken as text, unless it is a data: URI (never embedded as text)."""
    if _DATA_URI.match(value):
        raise InvalidInput(
            f"is a data: URI, which is not embedded as text; {_HOW_TO_SEND_AN_IMAGE}",
            field=field,
            index=index,
        )
    return value


#: The key each content-part `type` names.
_PART_TYPES = {"text": "text", "image": "image", "image_url": "image_url", "pixels": "pixels"}


def _item(value: _RawItem, field: str, index: int, modality: str = "text") -> ParsedItem:
    if isinstance(value, str):
        if modality == "image":
            return image_string(value, field, index)
        return text_input(value, field, index)
    if isinstance(value, _InputObject):
        given = [
            k for k in ("text", "image", "pixels", "image_url") if getattr(value, k) is not None
        ]
        if value.type is not None and (
            value.type not in _PART_TYPES or [_PART_TYPES[value.type]] != given
        ):
            raise InvalidInput(
                f"an object of type {value.type[:32]!r} must hold "
                f"{_PART_TYPES.get(value.type, 'text or image_url')!r} alone, not "
                f"{' and '.join(given) if given else 'nothing'}",
                field=field,
                index=index,
            )
        if given == ["text"]:
            return text_input(value.text, field, index)  # type: ignore[arg-type]
        if given == ["image"]:
            return decode_image(value.image, field, index)  # type: ignore[arg-type]
        if given == ["pixels"]:
            return PresizedPixels(decode_image(value.pixels, field, index))  # type: ignore[arg-type]
        if given == ["image_url"]:
            part = value.image_url
            url = part if isinstance(part, str) else part.url  # type: ignore[union-attr]
            return image_string(url, field, index)
        raise InvalidInput(
            'an object input is {"text": "..."}, {"image": "<base64 or data: URI>"}, '
            '{"image_url": {"url": "<data: URI or URL>"}} or '
            '{"pixels": "<base64 of S*S*3 RGB bytes>"}, '
            f"not one with {' and '.join(given) if given else 'neither'}",
            field=field,
            index=index,
        )
    raise InvalidInput(_TOKEN_IDS, field=field, index=index)


def _items(values: list[_RawItem], field: str, modality: str = "text") -> list[ParsedItem]:
    return [_item(v, field, i, modality) for i, v in enumerate(values)]


def _language(language: str | None) -> str | None:
    """The optional `language` (null or "": the model's default)."""
    return language or None


def parse_embeddings(body: bytes, bounds: JsonBounds) -> EmbeddingsRequest:
    """A `/v1/embeddings` body → what to embed and how to answer."""
    parsed: _EmbeddingsBody = _decode(body, _EmbeddingsBody, bounds)
    raw = parsed.input
    if raw is msgspec.UNSET:
        raise InvalidInput("is required (a string, or a list of strings or objects)", field="input")
    modality = parsed.modality or "text"
    if modality not in ("text", "image"):
        raise InvalidInput(f"must be text or image, not {modality[:32]!r}", field="modality")
    if isinstance(raw, str):
        items = _items([raw], "input", modality)
    elif raw and all(isinstance(v, int) for v in raw):
        raise InvalidInput(_TOKEN_IDS, field="input")
    else:
        items = _items(raw, "input", modality)
    if not items:
        raise InvalidInput("is empty: send at least one text or image", field="input")
    encoding = parsed.encoding_format or "float"
    if encoding not in ENCODING_FORMATS:
        raise InvalidInput(
            f"must be one of {', '.join(ENCODING_FORMATS)}, not {encoding[:32]!r}",
            field="encoding_format",
        )
    dimensions = parsed.dimensions
    if dimensions is not None and dimensions < 1:
        raise InvalidInput(f"must be a positive integer, not {dimensions!r}", field="dimensions")
    return EmbeddingsRequest(
        parsed.model or "",
        items,
        encoding,
        dimensions,
        _language(parsed.language),
        parsed.priority,
    )


def parse_classify(body: bytes, bounds: JsonBounds) -> ClassifyRequest:
    """A `/v1/classify` body: `images` (base64), `labels`, `templates`, `top_k`, `model`."""
    parsed: _ClassifyBody = _decode(body, _ClassifyBody, bounds)
    if parsed.images and parsed.pixels:
        raise InvalidInput(
            "must be a list of base64 strings, sent instead of images (not with them)",
            field="pixels",
        )
    images: list[bytes | PresizedPixels | ImageUrl] = [
        image_string(v, "images", i, strict=False) for i, v in enumerate(parsed.images or [])
    ]
    images += [
        PresizedPixels(decode_image(v, "pixels", i)) for i, v in enumerate(parsed.pixels or [])
    ]
    return ClassifyRequest(
        model=parsed.model or "",
        images=images,
        labels=list(parsed.labels or []),
        templates=list(parsed.templates or []),
        top_k=parsed.top_k or 0,
        language=_language(parsed.language),
        priority=parsed.priority,
    )


def parse_similarity(body: bytes, bounds: JsonBounds) -> SimilarityRequest:
    """A `/v1/similarity` body: `queries` and `candidates` as items, `model`."""
    parsed: _SimilarityBody = _decode(body, _SimilarityBody, bounds)
    return SimilarityRequest(
        model=parsed.model or "",
        queries=_items(parsed.queries or [], "queries"),
        candidates=_items(parsed.candidates or [], "candidates"),
        language=_language(parsed.language),
        priority=parsed.priority,
    )


def parse_struct(body: bytes, kind: type[T], bounds: JsonBounds) -> T:
    """A body of another route's struct type (the catalog's), bounded and refused like
    the ones above; its decoder is made once per type."""
    if kind not in _DECODERS:
        _DECODERS[kind] = msgspec.json.Decoder(kind)
    decoded: T = _decode(body, kind, bounds)
    return decoded


def check_dimensions(dimensions: int | None, model_dim: int, model: str) -> None:
    """CLIP vectors cannot be shortened: `dimensions` may only repeat the model's own."""
    if dimensions is not None and dimensions != model_dim:
        raise InvalidInput(
            f"model {model!r} makes {model_dim}-dimensional vectors and cannot shorten them "
            f"(CLIP is not trained for truncation); leave dimensions out or send {model_dim}",
            field="dimensions",
        )


def encode_vector(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    """A vector as OpenAI answers it: float32 values (written as a JSON list of floats by
    the encoder), or base64 of little-endian float32; the compact formats as integers
    (`vector_formats.quantize`, written as a JSON list of integers)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    if encoding_format in vector_formats.FORMATS:
        return vector_formats.quantize(vector, encoding_format)
    return np.asarray(vector, dtype=np.float32)


#: Characters JSON writes as more than themselves (`\"`, `\\`, `\u001f`).
_JSON_ESCAPED = re.compile(r'[\x00-\x1f"\\]')


def json_string_bytes(text: str) -> int:
    """Bytes `text` takes as a JSON string (quotes and escapes included) at most."""
    return len(text.encode("utf-8", "surrogatepass")) + 2 + 5 * len(_JSON_ESCAPED.findall(text))


def _encode_hook(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise NotImplementedError(f"cannot write {type(value).__name__} as JSON")


_ENCODER = msgspec.json.Encoder(enc_hook=_encode_hook)


def encode_json(answer: Any) -> bytes:
    """An answer (numpy arrays written as lists) → JSON bytes."""
    return _ENCODER.encode(answer)
