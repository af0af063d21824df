"""Pre-sized pixels and `--fast-jpeg` without servers: lengths, keys, the draft's floor."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.api.clip.v1 import clip_pb2
from service.client_pixels import PixelPool, PixelRecipe, make_pixels
from service.core.cache_keys import embedding_key
from service.core.image_preprocess import (
    ImageLimits,
    ImageSpec,
    PresizedPixels,
    _draft_large_jpeg,
    _read_header,
    check_pixels,
    image_pixels,
    preprocess_image_bytes,
    unpack_pixels,
)
from service.errors import InvalidInput
from service.server.http_schema import JsonBounds, parse_classify, parse_embeddings
from tests.support.images import encode, photo_like

LIMITS = ImageLimits(max_bytes=50_000_000, max_pixels=50_000_000)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_pixels_unpack_to_the_tensor_the_gateway_decodes(fmt: str) -> None:
    blob = encode(photo_like(333, 171, seed=2), fmt)
    spec = ImageSpec(224)
    pixels = image_pixels(blob, spec, LIMITS)
    assert len(pixels) == 224 * 224 * 3
    unpacked = unpack_pixels(PresizedPixels(pixels), 224)
    np.testing.assert_array_equal(unpacked, preprocess_image_bytes(blob, spec, LIMITS))
    assert unpacked.flags.c_contiguous and unpacked.shape == (3, 224, 224)
    # Planar: the red plane, then green, then blue, each row by row.
    rgb = Image.frombytes("RGB", (224, 224), unpacked.transpose(1, 2, 0).tobytes())
    assert pixels[7 * 224 + 5] == rgb.getpixel((5, 7))[0]
    assert pixels[224 * 224 + 7 * 224 + 5] == rgb.getpixel((5, 7))[1]


@pytest.mark.parametrize("length", [0, 1, 64 * 64 * 3 - 1, 64 * 64 * 3 + 1, 224 * 224 * 3])
def test_only_exactly_s_s_3_bytes_are_pixels(length: int) -> None:
    with pytest.raises(InvalidInput, match=rf"pixels are {length} bytes.*= 12288 bytes"):
        check_pixels(PresizedPixels(bytes(length)), 64)
    check_pixels(PresizedPixels(bytes(12288)), 64)


def test_pixel_keys_are_their_own_kind_and_name_the_model() -> None:
    payload = bytes(range(256)) * 48
    as_image = embedding_key("m@1", "image", payload, "pp1/64/bicubic/exif")
    as_pixels = embedding_key("m@1", "pixels", payload, "px/64")
    other_model = embedding_key("m@2", "pixels", payload, "px/64")
    assert len({as_image, as_pixels, other_model}) == 3
    assert ":pixels:" in as_pixels and ":m@1:" in as_pixels


def _jpeg(width: int, height: int) -> bytes:
    return encode(photo_like(width, height, seed=4), "JPEG", quality=92)


@pytest.mark.parametrize(
    ("size", "canvas", "decoded"),
    [
        ((4000, 3000), 224, (1000, 750)),  # 1/4: 1/8 would be 375 < 448
        ((3000, 4000), 224, (750, 1000)),
        ((1920, 1080), 224, (960, 540)),  # 1/2
        ((896, 1200), 224, (448, 600)),  # exactly 2 × 2S: 1/2 still allowed
        ((895, 1200), 224, (895, 1200)),  # one less: no reduction
        ((640, 480), 224, (640, 480)),
        ((4000, 3000), 64, (500, 375)),  # 1/8, the most libjpeg does
    ],
)
def test_fast_jpeg_never_decodes_below_twice_the_short_side(
    size: tuple[int, int], canvas: int, decoded: tuple[int, int]
) -> None:
    image = _read_header(_jpeg(*size), LIMITS)
    _draft_large_jpeg(image, canvas)
    assert image.size == decoded
    assert min(image.size) >= 2 * canvas or image.size == size
    image.load()
    assert image.size == decoded


def test_fast_jpeg_leaves_other_formats_and_the_default_path_alone() -> None:
    png = encode(photo_like(2000, 1500, seed=1), "PNG")
    exact = preprocess_image_bytes(png, ImageSpec(224), LIMITS)
    np.testing.assert_array_equal(
        preprocess_image_bytes(png, ImageSpec(224, fast_jpeg=True), LIMITS), exact
    )
    jpeg = _jpeg(2000, 1500)
    exact = preprocess_image_bytes(jpeg, ImageSpec(224), LIMITS)
    fast = preprocess_image_bytes(jpeg, ImageSpec(224, fast_jpeg=True), LIMITS)
    assert fast.shape == exact.shape
    assert not np.array_equal(fast, exact)  # it really took the other path
    # A smooth image: the reduced decode is close, pixel by pixel.
    assert np.abs(fast.astype(int) - exact.astype(int)).mean() < 3


def test_fast_jpeg_keeps_exif_rotation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    image = photo_like(2400, 1000, seed=9)
    blob = encode(image, "JPEG", quality=92, exif=exif.tobytes())
    upright = encode(image.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=92)
    fast = preprocess_image_bytes(blob, ImageSpec(224, fast_jpeg=True), LIMITS)
    fast_upright = preprocess_image_bytes(upright, ImageSpec(224, fast_jpeg=True), LIMITS)
    assert np.abs(fast.astype(int) - fast_upright.astype(int)).mean() < 3


def test_a_recipe_needs_a_server_that_takes_pixels() -> None:
    old = clip_pb2.ModelInfo(image_size=224)
    assert PixelRecipe.from_model_info(old) is None
    new = clip_pb2.ModelInfo(
        image_size=224, accepts_pixels=True, image_interpolation="bilinear", exif_transpose=False
    )
    recipe = PixelRecipe.from_model_info(new, fast_jpeg=True)
    assert recipe is not None
    assert recipe.spec == ImageSpec(224, "bilinear", fast_jpeg=True)
    assert recipe.limits.exif_transpose is False


class _InfoOnly:
    """A client whose server answers GetModelInfo with `info`."""

    def __init__(self, info: clip_pb2.ModelInfo) -> None:
        self.info = info

    async def model_info(self, model: str = "") -> clip_pb2.ModelInfo:
        return self.info


async def test_index_sends_pixels_only_to_a_catalog_that_takes_them(tmp_path) -> None:
    import argparse

    from service.client_cli import local_files

    image = tmp_path / "a.png"
    image.write_bytes(encode(photo_like(80, 60), "PNG"))
    args = argparse.Namespace(pixels=True, fast_jpeg=False, model="")
    pool = PixelPool(workers=0)
    # A gateway whose embedding calls take pixels but whose catalog predates them (it
    # would ignore CatalogItem.pixels and refuse an item with no input): files.
    embeds_only = clip_pb2.ModelInfo(image_size=64, accepts_pixels=True)
    both = clip_pb2.ModelInfo(image_size=64, accepts_pixels=True, catalog_accepts_pixels=True)
    sent = {}
    for name, info, catalog in [
        ("embed-dir", embeds_only, False),
        ("index, old catalog", embeds_only, True),
        ("index", both, True),
    ]:
        values = await local_files(_InfoOnly(info), args, [image], pool, catalog=catalog)  # type: ignore[arg-type]
        sent[name] = [type(value).__name__ for _, value in [v async for v in values]]
    assert sent == {
        "embed-dir": ["PresizedPixels"],
        "index, old catalog": ["bytes"],
        "index": ["PresizedPixels"],
    }


def test_pixels_the_client_cannot_make_are_none_so_the_server_answers(tmp_path) -> None:
    recipe = PixelRecipe(ImageSpec(64), LIMITS)
    good = tmp_path / "good.png"
    good.write_bytes(encode(photo_like(80, 60), "PNG"))
    made = PixelPool(workers=0).make(
        [str(good), b"not an image", str(tmp_path / "missing.jpg")], recipe
    )
    assert made[0] == make_pixels(good.read_bytes(), recipe) and len(made[0] or b"") == 12288
    assert made[1:] == [None, None]


def test_http_bodies_carry_pixels_as_their_own_kind() -> None:
    import base64
    import json

    bounds = JsonBounds.for_limits(max_items=256, max_labels=1000, max_templates=32)

    def body(value: object) -> bytes:
        return json.dumps(value).encode()

    raw = bytes(12288)
    pixels = base64.b64encode(raw).decode()
    items = parse_embeddings(body({"input": [{"pixels": pixels}, {"text": "x"}]}), bounds).items
    assert items == [PresizedPixels(raw), "x"]
    parsed = parse_classify(body({"pixels": [pixels], "labels": ["a"]}), bounds)
    assert parsed.images == [PresizedPixels(raw)]
    with pytest.raises(InvalidInput, match=r"pixels: .*not with them"):
        parse_classify(body({"pixels": ["AAAA"], "images": ["AAAA"], "labels": ["a"]}), bounds)
    with pytest.raises(InvalidInput, match=r"not one with image and pixels"):
        parse_embeddings(body({"input": [{"pixels": pixels, "image": pixels}]}), bounds)


def test_draft_is_header_only_until_load() -> None:
    buffer = io.BytesIO(_jpeg(1600, 1200))
    image = Image.open(buffer)
    _draft_large_jpeg(image, 224)
    assert image.size == (800, 600)  # nothing decoded yet, and only this much will be
