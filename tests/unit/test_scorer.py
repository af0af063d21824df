"""`Scorer`: when one half of a Similarity or Classify fails, the other half's work stops
(README: "its sibling work stops"), and the failure names the caller's own field.

The embedder is a fake: one side fails at once, the other waits on the backend until it
is cancelled, and records that it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from service.core.scoring import Scorer
from service.core.validation import Limits
from service.errors import InvalidInput

LIMITS = Limits(
    max_items=64,
    max_image_bytes=1 << 20,
    max_image_pixels=1 << 20,
    max_text_chars=1000,
    max_labels=64,
    max_templates=8,
    max_label_chars=100,
    max_prompts=512,
)


class _Embedder:
    """Texts (and label prompts) wait on a backend that never answers; images fail."""

    limits = LIMITS
    metadata = SimpleNamespace(embedding_dim=4, logit_scale=100.0, logit_bias=None)

    def __init__(self) -> None:
        self.text_work_started = asyncio.Event()
        self.text_work_cancelled = False

    def check_language(self, language: str | None) -> None:
        return None

    async def _backend(self) -> Any:
        self.text_work_started.set()
        try:
            await asyncio.Event().wait()  # the backend never answers
        except asyncio.CancelledError:
            self.text_work_cancelled = True
            raise

    async def embed_texts(self, texts: Sequence[str], **_: Any) -> Any:
        return await self._backend()

    async def label_embeddings(self, labels: Sequence[str], templates: Any, **_: Any) -> Any:
        return await self._backend()

    async def embed_images(self, images: Sequence[bytes], **_: Any) -> Any:
        await self.text_work_started.wait()  # fail once the other half is under way
        raise InvalidInput("not an image", field="images", index=len(images) - 1)


async def test_a_failing_similarity_half_cancels_the_other_and_names_the_callers_field() -> None:
    embedder = _Embedder()
    scorer = Scorer(embedder)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as caught:
        await scorer.similarity(["a cat"], ["a dog", b"\x00bad"], timeout_s=5.0)
    # The bad image is the candidates' item 1 (item 0 of the images among them).
    assert (caught.value.field, caught.value.index) == ("candidates", 1)
    assert embedder.text_work_cancelled


async def test_a_failing_image_cancels_the_label_prompts_of_classify() -> None:
    embedder = _Embedder()
    scorer = Scorer(embedder)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="not an image"):
        await scorer.classify([b"\x00bad"], ["cat", "dog"], [], 0, timeout_s=5.0)
    assert embedder.text_work_cancelled
