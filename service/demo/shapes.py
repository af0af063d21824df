"""A deterministic synthetic image set: one coloured shape per image, with a caption.

Everything is drawn with PIL from a `random.Random`, so a seed fixes every pixel.
The images are meant for the demo CLIP (image size 64): the target shape is always
large and intact, the backgrounds and distractors only add enough nuisance that the
model has to look at the shape's own colour and outline.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "white",
    "black",
)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")

# Colour-major order: index = COLOURS.index(c) * len(SHAPES) + SHAPES.index(s).
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
LABELS: tuple[str, ...] = tuple(f"{c} {s}" for c, s in ALL_PAIRS)

# Never rendered for training. Every colour is held out exactly once and every shape
# at least once (triangle and star twice), so each colour is still trained with five
# shapes and each shape with six or seven colours: held-out accuracy then measures
# composition, not recognising an unseen colour or shape.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("orange", "hexagon"),
    ("yellow", "cross"),
    ("green", "triangle"),
    ("blue", "circle"),
    ("purple", "square"),
    ("white", "triangle"),
    ("black", "star"),
)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)

# One `{}` each, filled with "colour shape". The last few are CLIP's own ImageNet
# prompt style, so zero-shot with the usual prompt lists lands on familiar text.
TEMPLATES: tuple[str, ...] = (
    "a {}",
    "a {}.",
    "{}",
    "a photo of a {}.",
    "a drawing of a {}.",
    "an image of a {}",
    "a {} on a background",
    "a picture of the {}.",
    "the {}.",
    "a {} shape.",
    "a simple {}.",
    "a good photo of a {}.",
    "a rendering of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a bright photo of a {}.",
    "a cropped photo of the {}.",
    "a sketch of a {}.",
)

# Base RGB per colour name; each render jitters it a little (see `_shape_rgb`).
_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (250, 140, 10),
    "yellow": (245, 225, 35),
    "green": (35, 165, 60),
    "blue": (30, 70, 215),
    "purple": (135, 45, 175),
    "white": (250, 250, 250),
    "black": (12, 12, 12),
}

_SUPERSAMPLE = 3  # draw at 3x and downscale: anti-aliased edges without aggdraw
_MIN_CONTRAST = 110.0  # RGB distance kept between the shape and any background colour


def label_index(colour: str, shape: str) -> int:
    """Index of "colour shape" in LABELS."""
    return COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


def _dist(a: Sequence[float], b: Sequence[float]) -> float:
    return math.dist(a, b)


def _shape_rgb(colour: str, rng: random.Random) -> tuple[int, int, int]:
    # Small jitter only: enough that a colour is a region, not one exact value, while
    # orange stays apart from red and yellow.
    return tuple(max(0, min(255, v + rng.randint(-14, 14))) for v in _RGB[colour])  # type: ignore[return-value]


def _background_rgb(rng: random.Random, avoid: Sequence[float]) -> tuple[int, int, int]:
    # Muted random colours (blended toward a random grey) so a background rarely reads
    # as one of the eight named colours, and never close to the shape's colour.
    while True:
        grey = rng.uniform(30, 230)
        mix = rng.uniform(0.35, 0.9)
        rgb = tuple(int(grey * mix + rng.uniform(0, 255) * (1 - mix)) for _ in range(3))
        if _dist(rgb, avoid) >= _MIN_CONTRAST:
            return rgb  # type: ignore[return-value]


def _background(size: int, rng: random.Random, avoid: Sequence[float]) -> Image.Image:
    kind = rng.random()
    c0 = _background_rgb(rng, avoid)
    if kind < 0.45:
        return Image.new("RGB", (size, size), c0)
    # Linear gradient at a random angle between two background colours.
    c1 = _background_rgb(rng, avoid)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    t = t[..., None]
    arr = np.asarray(c0, np.float32) * (1 - t) + np.asarray(c1, np.float32) * t
    return Image.fromarray(arr.round().astype(np.uint8), "RGB")


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of `shape` with circumradius `r` around (cx, cy), rotated by `rot`."""
    if shape == "square":
        pts = [(1.0, k * math.pi / 2 + math.pi / 4) for k in range(4)]
    elif shape == "triangle":
        pts = [(1.0, k * 2 * math.pi / 3 - math.pi / 2) for k in range(3)]
    elif shape == "hexagon":
        pts = [(1.0, k * math.pi / 3) for k in range(6)]
    elif shape == "star":
        pts = [(1.0 if k % 2 == 0 else 0.42, k * math.pi / 5 - math.pi / 2) for k in range(10)]
    elif shape == "cross":
        # A plus sign: arms a third of the full width wide.
        h = 1.0 / 3.0
        xy = [
            (h, 1),
            (h, h),
            (1, h),
            (1, -h),
            (h, -h),
            (h, -1),
            (-h, -1),
            (-h, -h),
            (-1, -h),
            (-1, h),
            (-h, h),
            (-h, 1),
        ]
        norm = math.hypot(1, h)
        pts = [(math.hypot(x, y) / norm, math.atan2(y, x)) for x, y in xy]
    else:
        raise ValueError(f"not a polygon shape: {shape!r}")
    return [(cx + r * rr * math.cos(a + rot), cy + r * rr * math.sin(a + rot)) for rr, a in pts]


def _distractors(draw: ImageDraw.ImageDraw, big: int, rng: random.Random, avoid: str) -> None:
    # Thin lines and tiny dots in other named colours: clutter that is clearly not a
    # shape (dots are at most a sixth of the smallest shape's radius).
    others = [c for c in COLOURS if c != avoid]
    s = _SUPERSAMPLE
    for _ in range(rng.randint(1, 3)):
        rgb = _shape_rgb(rng.choice(others), rng)
        if rng.random() < 0.5:
            x0, y0, x1, y1 = (rng.uniform(0, big) for _ in range(4))
            draw.line([(x0, y0), (x1, y1)], fill=rgb, width=s)
        else:
            for _ in range(rng.randint(1, 4)):
                x, y, d = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(1.0, 2.0) * s
                draw.ellipse([x - d, y - d, x + d, y + d], fill=rgb)


def render(colour: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    """Draw one `colour` `shape` on a random background; deterministic given `rng`'s state."""
    if colour not in _RGB or shape not in SHAPES:
        raise ValueError(f"unknown pair: {colour!r} {shape!r}")
    fg = _shape_rgb(colour, rng)
    big = size * _SUPERSAMPLE
    img = _background(size, rng, fg).resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    # Distractors go under the shape so its outline is never broken.
    if rng.random() < 0.35:
        _distractors(draw, big, rng, colour)

    # Circumradius 22%–42% of the image: always the dominant object.
    r = rng.uniform(0.22, 0.42) * big
    margin = r + 0.03 * big
    cx, cy = rng.uniform(margin, big - margin), rng.uniform(margin, big - margin)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=fg)

    img = img.resize((size, size), Image.Resampling.BOX)
    if rng.random() < 0.3:
        # Light sensor-like noise, seeded from rng so the image stays deterministic.
        sigma = rng.uniform(3.0, 10.0)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, sigma, (size, size, 3))
        arr = np.asarray(img, np.float32) + noise
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")
    return img


def sample(
    rng: random.Random, pairs: Sequence[tuple[str, str]], size: int = 64
) -> tuple[Image.Image, str, int]:
    """One random (image, caption, index into LABELS) drawn from `pairs`."""
    colour, shape = rng.choice(pairs)
    image = render(colour, shape, rng, size)
    caption = rng.choice(TEMPLATES).format(f"{colour} {shape}")
    return image, caption, label_index(colour, shape)


def make_eval_set(
    seed: int, n_per_pair: int, pairs: Sequence[tuple[str, str]], size: int = 64
) -> tuple[list[Image.Image], list[int]]:
    """`n_per_pair` fresh images of every pair in `pairs`, with their LABELS indices."""
    rng = random.Random(seed)
    images: list[Image.Image] = []
    labels: list[int] = []
    for colour, shape in pairs:
        for _ in range(n_per_pair):
            images.append(render(colour, shape, rng, size))
            labels.append(label_index(colour, shape))
    return images, labels
