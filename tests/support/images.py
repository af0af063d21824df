"""Test images: real photos, smooth synthetic ones, and encoding to bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    """Image → encoded bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def photo_like(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A smooth colourful RGB image (compresses like a photo, unlike noise)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6.28, 3)
    channels = [
        127 + 120 * np.sin(x / (17 + 5 * i) + y / (23 + 3 * i) + phase[i]) for i in range(3)
    ]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))


def real_photos() -> dict[str, Image.Image]:
    """Real photos that ship inside scikit-image and scikit-learn (no download)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {
        "astronaut": Image.fromarray(data.astronaut()),
        "chelsea": Image.fromarray(data.chelsea()),
        "coffee": Image.fromarray(data.coffee()),
        "rocket": Image.fromarray(data.rocket()),
        "camera": Image.fromarray(data.camera()),  # grayscale (L)
    }
    sample = load_sample_images()
    for name, array in zip(("china", "flower"), sample.images, strict=True):
        photos[name] = Image.fromarray(array)
    return photos
