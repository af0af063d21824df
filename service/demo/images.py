"""Write the demo's rendered shapes as PNG files: a folder to index (`clipsvc index`).

    python -m service.demo.images demo-images/      # colour/colour_shape_k.png, 3 per pair

Deterministic (one seed): every run writes the same pixels, so re-indexing finds them
unchanged.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from service.demo.shapes import ALL_PAIRS, render


def write_demo_images(out: Path, per_pair: int = 3, seed: int = 7) -> list[Path]:
    """`per_pair` images of every colour-shape pair under `out`; the paths written."""
    rng = random.Random(seed)
    written = []
    for colour, shape in ALL_PAIRS:
        folder = out / colour
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_pair):
            path = folder / f"{colour}_{shape}_{k}.png"
            render(colour, shape, rng).save(path)
            written.append(path)
    return written


def main() -> None:
    """Command line: the folder, images per pair."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-pair", type=int, default=3)
    args = parser.parse_args()
    paths = write_demo_images(args.out, args.per_pair)
    print(f"wrote {len(paths)} images under {args.out}")


if __name__ == "__main__":
    main()
