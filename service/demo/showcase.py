"""`make run`'s first screen: the demo model classifying freshly rendered shapes.

Runs the real pipeline in-process (image bytes → preprocess → exported TorchScript →
zero-shot over all 48 labels), so what it prints is what the gateway would answer.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
from collections.abc import Sequence
from pathlib import Path

from service.core.scoring import Scorer
from service.demo.shapes import HELD_OUT_PAIRS, LABELS, TEMPLATES, render
from service.metrics import Metrics
from service.settings import DEFAULT_MODEL_REPOSITORY, Settings
from service.wiring import build_embedder

_SHOWN = (
    ("red", "circle"),
    ("blue", "star"),
    ("yellow", "triangle"),
    ("green", "hexagon"),
    ("white", "cross"),
    ("purple", "square"),
    *HELD_OUT_PAIRS[:4],
)


async def _run(repository: Path, seed: int) -> int:
    embedder = build_embedder(Settings(model_repository=repository), Metrics())
    await embedder.start()
    try:
        rng = random.Random(seed)
        blobs = []
        for colour, shape in _SHOWN:
            buffer = io.BytesIO()
            render(colour, shape, rng).save(buffer, "PNG")
            blobs.append(buffer.getvalue())
        ranked = await Scorer(embedder).classify(
            blobs, list(LABELS), list(TEMPLATES), top_k=3, timeout_s=None
        )
    finally:
        await embedder.aclose()
    print(f"\nzero-shot over {len(LABELS)} labels with {embedder.model_id}")
    print(f"{'rendered':<18} {'predicted':<18} {'p':>6}   runner-up")
    correct = 0
    for (colour, shape), labels in zip(_SHOWN, ranked, strict=True):
        truth = f"{colour} {shape}"
        best, second = labels[0], labels[1]
        mark = "ok" if best.label == truth else "MISS"
        correct += best.label == truth
        held = " (held out of training)" if (colour, shape) in HELD_OUT_PAIRS else ""
        print(
            f"{truth:<18} {best.label:<18} {best.probability:6.1%}   "
            f"{second.label} {second.probability:.1%}  {mark}{held}"
        )
    print(f"{correct}/{len(_SHOWN)} correct\n")
    return 0 if correct >= len(_SHOWN) - 1 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python -m service.demo.showcase [--repository DIR]`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    return asyncio.run(_run(args.repository, args.seed))


if __name__ == "__main__":
    raise SystemExit(main())
