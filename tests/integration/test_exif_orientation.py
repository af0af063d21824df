"""EXIF orientation: every orientation (1-8) is applied before preprocessing, as a person
sees the photo; `--no-exif-transpose` turns it off, and its vectors are cached under keys
of their own, so two gateways that differ only in this setting never share entries.

The reference is open_clip on the image turned by hand from the EXIF table (not by
`ImageOps.exif_transpose`, which the service itself uses).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from service.client import AsyncClipClient
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.redis_server import RedisServer
from service.server.app import Gateway
from tests.support.images import encode
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration

TOL = 1e-5
T = Image.Transpose
# EXIF 2.3, tag 0x0112: how to turn the stored pixels so that they look right.
TURN = {
    1: None,
    2: T.FLIP_LEFT_RIGHT,  # mirrored
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,  # mirrored, then turned 90° counter-clockwise
    6: T.ROTATE_270,  # stored turned 90° counter-clockwise: turn it 90° clockwise
    7: T.TRANSVERSE,
    8: T.ROTATE_90,
}


def _jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


@pytest.fixture(scope="module")
def blobs(photos: dict[str, Image.Image]) -> dict[int, bytes]:
    """The same stored pixels (a non-square, asymmetric photo) under each orientation."""
    stored = photos["chelsea"].resize((160, 100))
    return {o: _jpeg_with_orientation(stored, o) for o in TURN}


def _open_clip(model: ExportedModel, images: list[Image.Image]) -> np.ndarray:
    _, _, preprocess = open_clip.create_model_and_transforms(model.name, pretrained=None)
    with torch.no_grad():
        batch = torch.stack([preprocess(image) for image in images])
        return model.clip.encode_image(batch, normalize=True).numpy()


def _decoded(blob: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(blob))
    image.load()
    return image


def _turned(blob: bytes, orientation: int) -> Image.Image:
    image = _decoded(blob)
    assert image.getexif().get(0x0112) == orientation
    turn = TURN[orientation]
    return image if turn is None else image.transpose(turn)


@pytest.fixture(scope="module")
async def gateways(
    demo_model: ExportedModel, redis_server: RedisServer
) -> AsyncIterator[dict[bool, Gateway]]:
    """Two gateways on one Redis, Redis their only cache, differing only in the EXIF setting."""
    common = {"redis_url": redis_server.url, "local_cache_items": 0, "redis_timeout_s": 5.0}
    turned = gateway_settings(demo_model.repository, exif_transpose=True, **common)
    raw = gateway_settings(demo_model.repository, exif_transpose=False, **common)
    async with running_gateway(turned) as with_exif, running_gateway(raw) as without_exif:
        yield {True: with_exif, False: without_exif}


async def _embed(gateway: Gateway, images: list[bytes]) -> tuple[np.ndarray, list[bool]]:
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        result = await client.embed_image(images)
    return result.vectors, result.cached


async def test_every_orientation_is_applied_before_preprocessing(
    gateways: dict[bool, Gateway], demo_model: ExportedModel, blobs: dict[int, bytes]
) -> None:
    got, _ = await _embed(gateways[True], list(blobs.values()))
    want = _open_clip(demo_model, [_turned(blob, o) for o, blob in blobs.items()])
    worst = np.abs(got - want).max(axis=1)
    assert worst.max() <= TOL, dict(zip(blobs, worst.tolist(), strict=True))
    # Eight different pictures: a step that ignored one orientation would show.
    for i in range(len(got)):
        for j in range(i):
            assert np.abs(got[i] - got[j]).max() > 100 * TOL, (i + 1, j + 1)


async def test_no_exif_transpose_embeds_the_stored_pixels(
    gateways: dict[bool, Gateway], demo_model: ExportedModel, blobs: dict[int, bytes]
) -> None:
    got, _ = await _embed(gateways[False], list(blobs.values()))
    want = _open_clip(demo_model, [_decoded(blob) for blob in blobs.values()])
    assert np.abs(got - want).max() <= TOL


async def test_the_two_settings_never_share_cache_entries(
    gateways: dict[bool, Gateway], demo_model: ExportedModel, photos: dict[str, Image.Image]
) -> None:
    # Bytes neither gateway has seen, so the first call of each computes.
    blob = _jpeg_with_orientation(photos["coffee"].resize((150, 90)), 6)
    turned, turned_cached = await _embed(gateways[True], [blob])
    raw, raw_cached = await _embed(gateways[False], [blob])  # same bytes, other setting
    assert turned_cached == [False] and raw_cached == [False], "one hit the other's entry"
    np.testing.assert_allclose(raw[0], _open_clip(demo_model, [_decoded(blob)])[0], atol=TOL)
    np.testing.assert_allclose(turned[0], _open_clip(demo_model, [_turned(blob, 6)])[0], atol=TOL)
    # Each setting finds its own entry in the shared Redis afterwards.
    again_turned, cached = await _embed(gateways[True], [blob])
    assert cached == [True]
    np.testing.assert_array_equal(again_turned, turned)
    again_raw, cached = await _embed(gateways[False], [blob])
    assert cached == [True]
    np.testing.assert_array_equal(again_raw, raw)
