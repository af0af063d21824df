"""Scores between vectors: Similarity and zero-shot Classify, and the math under both.

`Scorer` owns the two scoring calls (validation, splitting by modality, scoring,
ranking) on top of an `Embedder`; the functions below it are the pure math.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from service.core import validation
from service.core.image_preprocess import PresizedPixels
from service.core.prompts import DEFAULT_TEMPLATES
from service.errors import InvalidInput

if TYPE_CHECKING:
    from service.core.embedder import Embedder, EmbeddingResult

#: One Similarity item: a text, the bytes of an encoded image, or pre-sized pixels.
Item = str | bytes | PresizedPixels


def cosine(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix of L2-normalized rows: `[Q, C]`."""
    return (queries.astype(np.float32) @ candidates.astype(np.float32).T).astype(np.float32)


def softmax_scores(cos: np.ndarray, logit_scale: float) -> np.ndarray:
    """softmax(logit_scale × cosine) along the last axis, computed stably."""
    logits = cos.astype(np.float64) * logit_scale
    logits -= logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def sigmoid_scores(cos: np.ndarray, logit_scale: float, logit_bias: float) -> np.ndarray:
    """sigmoid(logit_scale × cosine + logit_bias) of each pair on its own (SigLIP's rule:
    not normalised over the candidates), computed without overflow."""
    logits = cos.astype(np.float64) * logit_scale + logit_bias
    # 1/(1+e^-x) for x ≥ 0 and e^x/(1+e^x) below: neither exponent can overflow.
    e = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def probabilities(cos: np.ndarray, logit_scale: float, logit_bias: float | None) -> np.ndarray:
    """The model's score rule: sigmoid per pair for models trained with a logit bias
    (SigLIP), else softmax over the last axis (CLIP)."""
    if logit_bias is None:
        return softmax_scores(cos, logit_scale)
    return sigmoid_scores(cos, logit_scale, logit_bias)


@dataclass(frozen=True)
class Ranked:
    """One label's result for one image."""

    label: str
    probability: float
    score: float


def rank(
    labels: Sequence[str], cos_row: np.ndarray, prob_row: np.ndarray, top_k: int
) -> list[Ranked]:
    """The `top_k` labels by probability, highest first (ties keep label order)."""
    order = np.argsort(-prob_row, kind="stable")[:top_k]
    return [Ranked(labels[i], float(prob_row[i]), float(cos_row[i])) for i in order]


@dataclass(frozen=True)
class SimilarityResult:
    """`[Q, C]` cosines and, per query, its probabilities over the candidates."""

    scores: np.ndarray
    probabilities: np.ndarray


class Scorer:
    """Similarity and zero-shot classification with one model's vectors and score rule."""

    def __init__(self, embedder: Embedder) -> None:
        self._embedder = embedder

    async def similarity(
        self,
        queries: Sequence[Item],
        candidates: Sequence[Item],
        *,
        timeout_s: float | None,
        language: str | None = None,
    ) -> SimilarityResult:
        """Every query against every candidate (texts and images may mix on both sides);
        probabilities by the model's rule (`probabilities`)."""
        self._embedder.check_language(language)
        limits = self._embedder.limits
        validation.check_count(len(queries), "queries", limits.max_items)
        validation.check_count(len(candidates), "candidates", limits.max_items)
        query_vecs, candidate_vecs = await _gather_failing_fast(
            self.embed_items(queries, "queries", timeout_s, language),
            self.embed_items(candidates, "candidates", timeout_s, language),
        )
        cos = cosine(query_vecs, candidate_vecs)
        meta = self._embedder.metadata
        return SimilarityResult(cos, probabilities(cos, meta.logit_scale, meta.logit_bias))

    async def classify(
        self,
        images: Sequence[bytes | PresizedPixels],
        labels: Sequence[str],
        templates: Sequence[str],
        top_k: int,
        *,
        timeout_s: float | None,
        language: str | None = None,
    ) -> list[list[Ranked]]:
        """Zero-shot: each image's labels ranked by the model's probabilities
        (softmax(logit_scale × cosine) over the labels, or SigLIP's per-label sigmoid)."""
        embedder = self._embedder
        embedder.check_language(language)
        # The caller's templates are checked against the limits; the default ensemble is ours.
        validation.check_labels(
            labels, templates, embedder.limits, ensemble_size=len(templates or DEFAULT_TEMPLATES)
        )
        templates = list(templates) or list(DEFAULT_TEMPLATES)
        k = validation.check_top_k(top_k, len(labels))
        # Checked here too (embed_images repeats it) so a bad image refuses the call
        # before any label prompt is embedded.
        validation.check_image_sizes(images, embedder.limits)
        embedded, label_matrix = await _gather_failing_fast(
            embedder.embed_images(images, timeout_s=timeout_s),
            embedder.label_embeddings(labels, templates, timeout_s=timeout_s, language=language),
        )
        image_matrix = np.stack([e.vector for e in embedded])
        cos = cosine(image_matrix, label_matrix)
        meta = embedder.metadata
        probs = probabilities(cos, meta.logit_scale, meta.logit_bias)
        return [rank(labels, cos[i], probs[i], k) for i in range(len(images))]

    async def embed_items(
        self,
        items: Sequence[Item],
        field: str,
        timeout_s: float | None,
        language: str | None = None,
    ) -> np.ndarray:
        """`[len(items), D]`: texts and images mixed, in order (each modality batched);
        a bad item is named by its index in `items`. The caller checks the count."""
        results = await self.embed_results(items, field, timeout_s, language)
        out = np.zeros((len(items), self._embedder.metadata.embedding_dim), dtype=np.float32)
        for position, result in enumerate(results):
            out[position] = result.vector
        return out

    async def embed_results(
        self,
        items: Sequence[Item],
        field: str,
        timeout_s: float | None,
        language: str | None = None,
    ) -> list[EmbeddingResult]:
        """Each item's result (texts and images mixed), in order; as `embed_items`."""
        self._embedder.check_language(language)  # named as itself, before any image decodes
        text_at = [i for i, item in enumerate(items) if isinstance(item, str)]
        image_at = [i for i, item in enumerate(items) if not isinstance(item, str)]
        texts = [str(items[i]) for i in text_at]
        images = [
            image if isinstance(image := items[i], PresizedPixels) else bytes(image)
            for i in image_at
        ]
        embedder = self._embedder
        try:
            text_results, image_results = await _gather_failing_fast(
                (
                    embedder.embed_texts(texts, timeout_s=timeout_s, language=language)
                    if texts
                    else _none()
                ),
                embedder.embed_images(images, timeout_s=timeout_s) if images else _none(),
            )
        except InvalidInput as exc:
            raise _reindex(exc, field, text_at if exc.field == "texts" else image_at) from None
        out: list[EmbeddingResult | None] = [None] * len(items)
        for positions, results in ((text_at, text_results), (image_at, image_results)):
            for position, result in zip(positions, results, strict=True):
                out[position] = result
        return [r for r in out if r is not None]


async def _gather_failing_fast(*calls: Awaitable[Any]) -> list[Any]:
    """`asyncio.gather` whose first failure cancels the sibling calls (no orphan work)."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _none() -> list[EmbeddingResult]:
    return []


def _reindex(exc: InvalidInput, field: str, positions: list[int]) -> InvalidInput:
    """Name the item's index in the caller's list, not in the per-modality sub-list."""
    index = positions[exc.index] if exc.index is not None else None
    return InvalidInput(exc.reason, field=field, index=index)
