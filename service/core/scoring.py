"""Zero-shot scoring: prompt templates, label-embedding ensembles, softmax, ranking."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: CLIP's ensemble when a caller gives none: the 7 templates the CLIP authors found to
#: work best on ImageNet, plus the plain "a photo of a {}." prompt.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def prompts(label: str, templates: Sequence[str]) -> list[str]:
    """The texts for one label: each template with `{}` replaced (no str.format pitfalls)."""
    return [template.replace("{}", label) for template in templates]


def ensemble(prompt_vectors: np.ndarray) -> np.ndarray:
    """One label's embedding: the normalized mean of its (normalized) prompt embeddings."""
    mean = prompt_vectors.astype(np.float32).mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def cosine(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix of L2-normalized rows: `[Q, C]`."""
    return (queries.astype(np.float32) @ candidates.astype(np.float32).T).astype(np.float32)


def softmax_scores(
    cos: np.ndarray, logit_scale: float, logit_bias: float | None = None
) -> np.ndarray:
    """softmax(logit_scale × cosine (+ bias)) along the last axis, computed stably."""
    logits = cos.astype(np.float64) * logit_scale + (logit_bias or 0.0)
    logits -= logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


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
