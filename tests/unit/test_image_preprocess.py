"""Where bytes become a tensor: mutated real images decode correctly or fail as InvalidInput."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.core.image_preprocess import (
    _INTERPOLATIONS,
    ImageLimits,
    ImageSpec,
    _center_crop_box,
    _resize_only_the_crop,
    _resized_size,
    preprocess_image_bytes,
)
from service.errors import InvalidInput
from tests.support.images import encode, photo_like

_SEEDS = [encode(photo_like(40, 30), fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]


# A mutated header may claim up to the 4 MP limit: decoding that takes well under a second
# even on a loaded 2-core machine, so an example past 5 s is a hang, not a slow machine.
@settings(
    max_examples=150,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.sampled_from(_SEEDS),
    cut=st.integers(min_value=0, max_value=2000),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
    junk=st.binary(max_size=64),
)
def test_fuzz_decode_never_raises_anything_but_invalid_input(
    seed: bytes, cut: int, flips: list[tuple[int, int]], junk: bytes
) -> None:
    """Mutated real images: either a correct uint8 [3,S,S] or InvalidInput, nothing else."""
    data = bytearray(seed[: max(1, len(seed) - cut)] + junk)
    for position, value in flips:
        data[position % len(data)] = value
    try:
        pixels = preprocess_image_bytes(
            bytes(data), ImageSpec(64), ImageLimits(max_bytes=1 << 20, max_pixels=4_000_000)
        )
    except InvalidInput:
        return
    assert pixels.shape == (3, 64, 64) and pixels.dtype == np.uint8


@pytest.mark.parametrize(
    ("width", "height", "interpolation", "bound"),
    [
        # One resize(box=...) call was 18 and 22 off on these (Pillow's passes reordered).
        (3, 1500, "bicubic", 0),
        (30, 700, "bicubic", 2),
        (1500, 3, "bicubic", 0),
        (9303, 33, "bicubic", 2),
        (7, 9000, "bilinear", 1),
        (5000, 17, "bilinear", 1),
    ],
)
def test_resizing_only_the_crop_equals_the_full_resize_within_rounding(
    width: int, height: int, interpolation: str, bound: int
) -> None:
    """The extreme-aspect path (too big to resize whole) against the full resize + crop,
    on noise (detail at every pixel, the worst case), at a size where both fit."""
    rng = np.random.default_rng(width * 31 + height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    size = 224
    resized = _resized_size(width, height, size)
    crop = _center_crop_box(*resized, size)
    resample = _INTERPOLATIONS[interpolation]
    full = np.asarray(image.resize(resized, resample).crop(crop), dtype=np.int16)
    ours = np.asarray(_resize_only_the_crop(image, resized, crop, resample), dtype=np.int16)
    assert ours.shape == (size, size, 3)
    assert np.abs(full - ours).max() <= bound
