"""The demo CLIP really works: 48-way zero-shot through the exported files and the pipeline."""

from __future__ import annotations

import io

import numpy as np
import pytest

from service.core.scoring import Scorer
from service.demo.shapes import HELD_OUT_PAIRS, LABELS, TEMPLATES, TRAIN_PAIRS, make_eval_set
from service.metrics import Metrics
from service.settings import Settings
from service.wiring import build_embedder
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration

# A seed the training script never uses (it trains on 0.. and evaluates on 10_000+).
EVAL_SEED = 987_654


async def _accuracy(model: ExportedModel, pairs: tuple[tuple[str, str], ...], n: int) -> float:
    embedder = build_embedder(Settings(model_repository=model.repository), Metrics())
    await embedder.start()
    scorer = Scorer(embedder)
    try:
        images, truth = make_eval_set(EVAL_SEED, n, pairs)
        blobs = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            blobs.append(buffer.getvalue())
        predicted: list[str] = []
        for start in range(0, len(blobs), 128):
            ranked = await scorer.classify(
                blobs[start : start + 128], list(LABELS), list(TEMPLATES), top_k=1, timeout_s=None
            )
            predicted += [r[0].label for r in ranked]
    finally:
        await embedder.aclose()
    return float(np.mean([p == LABELS[t] for p, t in zip(predicted, truth, strict=True)]))


@pytest.mark.parametrize(
    ("pairs", "n_per_pair", "floor"),
    [(TRAIN_PAIRS, 8, 0.95), (HELD_OUT_PAIRS, 25, 0.80)],
    ids=["seen-pairs", "held-out-pairs"],
)
async def test_zero_shot_accuracy(
    demo_model: ExportedModel, pairs: tuple[tuple[str, str], ...], n_per_pair: int, floor: float
) -> None:
    accuracy = await _accuracy(demo_model, pairs, n_per_pair)
    print(f"48-way zero-shot accuracy on {len(pairs) * n_per_pair} images: {accuracy:.3f}")
    assert accuracy >= floor
