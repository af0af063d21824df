"""Request checks that need no model: counts, sizes, labels, templates, top_k.

Every refusal is an `InvalidInput` naming the field, the item index and the rule, so a
caller can fix the request without guessing. Image content is checked while decoding
(`image_preprocess.py`); this module checks what can be known before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.core.image_preprocess import PresizedPixels
from service.errors import InvalidInput


@dataclass(frozen=True)
class Limits:
    """The caller-facing limits (their defaults and meaning live in `Settings`)."""

    max_items: int
    max_image_bytes: int
    max_image_pixels: int
    max_text_chars: int
    max_labels: int
    max_templates: int
    max_label_chars: int
    max_prompts: int


def check_count(n: int, field: str, limit: int, *, allow_empty: bool = False) -> None:
    """Refuse empty requests (unless allowed) and more than `limit` items."""
    if n == 0 and not allow_empty:
        raise InvalidInput(f"no {field} given; send at least one", field=field)
    if n > limit:
        # "input: 300 inputs in one request", not "300 input": fields are named in the
        # singular (OpenAI's `input`) or the plural (`texts`, `labels`).
        items = field if field.endswith("s") else f"{field}s"
        raise InvalidInput(
            f"{n} {items} in one request, over the limit of {limit}; split the request",
            field=field,
        )


def check_texts(texts: Sequence[str], limits: Limits, field: str = "texts") -> None:
    """Count and per-text length (characters) of a text batch."""
    check_count(len(texts), field, limits.max_items)
    for index, text in enumerate(texts):
        check_text(text, limits, field, index)


def check_text(text: str, limits: Limits, field: str = "texts", index: int | None = None) -> None:
    """One text's length in characters (truncation to the context length is not an error),
    then that it can be encoded."""
    if len(text) > limits.max_text_chars:
        raise InvalidInput(
            f"text is {len(text)} characters, over the limit of {limits.max_text_chars}",
            field=field,
            index=index,
        )
    check_encodable(text, field, index)


def check_encodable(text: str, field: str, index: int | None = None) -> None:
    """`text` is valid Unicode: a lone surrogate (JSON's `"\\ud800"`, or a str built in
    Python) has no UTF-8 form, so it could be neither hashed into a cache key nor tokenized."""
    if text.isascii():  # the common case, without building the encoded copy
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"text holds {text[exc.start : exc.end].encode('utf-8', 'backslashreplace').decode()}"
            f" at character {exc.start}, a lone surrogate that is not a Unicode character; "
            "send valid UTF-8 text",
            field=field,
            index=index,
        ) from None


def check_image_sizes(
    images: Sequence[bytes | PresizedPixels], limits: Limits, field: str = "images"
) -> None:
    """Count, emptiness and byte size of an image batch, before any decoding (the exact
    length of pre-sized pixels depends on the model: `image_preprocess.check_pixels`)."""
    check_count(len(images), field, limits.max_items)
    for index, image in enumerate(images):
        check_image_size(image, limits, field, index)


def check_image_size(
    image: bytes | PresizedPixels, limits: Limits, field: str = "images", index: int | None = None
) -> None:
    """One encoded image (or pre-sized pixels): not empty, not over the byte limit."""
    if isinstance(image, PresizedPixels):
        return  # exactly S·S·3 bytes, which only the model knows (`Embedder.check_images`)
    if not image:
        raise InvalidInput("image is empty (0 bytes)", field=field, index=index)
    if len(image) > limits.max_image_bytes:
        raise InvalidInput(
            f"image is {len(image)} bytes, over the limit of {limits.max_image_bytes} bytes",
            field=field,
            index=index,
        )


def check_labels(
    labels: Sequence[str],
    templates: Sequence[str],
    limits: Limits,
    *,
    ensemble_size: int | None = None,
) -> None:
    """Zero-shot labels (non-empty, unique, bounded) and templates (exactly one `{}`).

    `templates` are the caller's (the limits bound what callers send, not the default
    ensemble); `ensemble_size` is how many templates each label is embedded with (the
    prompt count), `len(templates)` when None.
    """
    check_count(len(labels), "labels", limits.max_labels)
    seen: dict[str, int] = {}
    for index, label in enumerate(labels):
        if not label.strip():
            raise InvalidInput("label is empty", field="labels", index=index)
        if len(label) > limits.max_label_chars:
            raise InvalidInput(
                f"label is {len(label)} characters, over the limit of {limits.max_label_chars}",
                field="labels",
                index=index,
            )
        check_encodable(label, "labels", index)
        if label in seen:
            raise InvalidInput(
                f"label {label!r} repeats labels[{seen[label]}]; labels must be unique",
                field="labels",
                index=index,
            )
        seen[label] = index
    check_count(len(templates), "templates", limits.max_templates, allow_empty=True)
    per_label = max(len(templates) if ensemble_size is None else ensemble_size, 1)
    prompts = len(labels) * per_label
    if prompts > limits.max_prompts:
        raise InvalidInput(
            f"{len(labels)} labels × {per_label} templates is {prompts} prompts, over the "
            f"limit of {limits.max_prompts}; send fewer labels or templates per call",
            field="labels",
        )
    for index, template in enumerate(templates):
        if len(template) > limits.max_label_chars:
            raise InvalidInput(
                f"template is {len(template)} characters, over the limit of "
                f"{limits.max_label_chars}",
                field="templates",
                index=index,
            )
        check_encodable(template, "templates", index)
        if template.count("{}") != 1:
            raise InvalidInput(
                f"template {template!r} must hold exactly one '{{}}' where the label goes "
                f"(found {template.count('{}')})",
                field="templates",
                index=index,
            )


def check_top_k(top_k: int, n_labels: int) -> int:
    """0 means all labels; a top_k past the label count is clamped to it."""
    if top_k < 0:
        raise InvalidInput(
            f"top_k is {top_k}; use 0 (all labels) or a positive number", field="top_k"
        )
    return n_labels if top_k == 0 else min(top_k, n_labels)
