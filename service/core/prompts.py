"""Zero-shot prompt ensembles: one label's prompts and the one vector they make.

Below both `embedder` (which embeds and caches the ensembles) and `scoring` (which
ranks labels by them), so that neither has to import the other for this math.
"""

from __future__ import annotations

from collections.abc import Sequence

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
