"""Pre-sized pixels (issue 28): the model's S×S RGB uint8 pixels instead of encoded images.

A real gateway (demo model, in this process) on loopback. Pixels made by the client's
code (`image_pixels`, the gateway's own preprocessing) must give the very vectors of the
encoded image on every route (EmbedImage, Similarity, Classify, EmbedStream, HTTP), and
open_clip's within 1e-5; a wrong length is refused by index, before any work.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import grpc
import numpy as np
import openai
import pytest
from PIL import Image

from service.api.clip.v1 import clip_pb2
from service.client import AsyncClipClient, ClipClient, decode_embedding
from service.client_pixels import PixelRecipe
from service.core.image_preprocess import image_pixels
from service.processes.gateway import gateway_settings, running_gateway
from service.server.app import Gateway
from tests.support.gateway import stub_for
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.reference import reference_images

pytestmark = pytest.mark.integration

TOL = 1e-5
# The same uint8 tensor through the same graph. Not bit for bit: the gateway's batcher may put
# a call's images in batches of other sizes (a stream's items arrive one by one), and a matmul
# over another batch size may round its last bit differently. One pixel off would move a
# vector by far more than this.
SAME = 1e-6


@pytest.fixture(scope="module")
async def gateway(demo_model: ExportedModel) -> AsyncIterator[Gateway]:
    # No LRU: every vector below is computed, none is the cached twin of another.
    async with running_gateway(gateway_settings(demo_model.repository, local_cache_items=0)) as gw:
        yield gw


def _blobs(photos: dict[str, Image.Image]) -> list[bytes]:
    """Real photos as JPEG and PNG, a grayscale one, a wide one and a rotated (EXIF) one."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    return [
        encode(photos["chelsea"], "JPEG", quality=90),
        encode(photos["coffee"], "PNG"),
        encode(photos["camera"], "JPEG"),
        encode(photo_like(400, 90, seed=3), "WEBP"),
        encode(photos["rocket"], "JPEG", exif=exif.tobytes()),
    ]


async def _recipe(stub: object) -> PixelRecipe:
    info = await stub.GetModelInfo(clip_pb2.GetModelInfoRequest(), timeout=30)  # type: ignore[attr-defined]
    assert info.accepts_pixels and info.image_size == 64
    assert info.image_interpolation == "bicubic" and info.exif_transpose
    recipe = PixelRecipe.from_model_info(info)
    assert recipe is not None
    return recipe


def _assert_same_labels(got: clip_pb2.ClassifyResponse, want: clip_pb2.ClassifyResponse) -> None:
    assert got.model == want.model
    assert [[x.label for x in r.labels] for r in got.results] == [
        [x.label for x in r.labels] for r in want.results
    ]
    np.testing.assert_allclose(
        [[x.score for x in r.labels] for r in got.results],
        [[x.score for x in r.labels] for r in want.results],
        atol=SAME,
        rtol=0,
    )


def _vectors(answer: clip_pb2.EmbedResponse) -> np.ndarray:
    return np.stack([decode_embedding(e) for e in answer.embeddings])


async def test_pixels_give_the_vectors_of_the_encoded_images_on_every_grpc_route(
    gateway: Gateway, demo_model: ExportedModel, photos: dict[str, Image.Image]
) -> None:
    blobs = _blobs(photos)
    async with stub_for(gateway.port) as stub:
        recipe = await _recipe(stub)
        pixels = [image_pixels(b, recipe.spec, recipe.limits) for b in blobs]
        assert all(len(p) == 64 * 64 * 3 for p in pixels)
        from_bytes = _vectors(
            await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=blobs), timeout=60)
        )
        from_pixels = _vectors(
            await stub.EmbedImage(clip_pb2.EmbedImageRequest(pixels=pixels), timeout=60)
        )
        np.testing.assert_allclose(from_pixels, from_bytes, atol=SAME, rtol=0)
        # open_clip's own (it ignores EXIF, which the gateway applies: the last photo).
        assert np.abs(from_pixels[:-1] - reference_images(demo_model, blobs[:-1])).max() <= TOL

        similarity = await stub.Similarity(
            clip_pb2.SimilarityRequest(
                queries=[clip_pb2.Item(pixels=pixels[0]), clip_pb2.Item(text="a cat")],
                candidates=[clip_pb2.Item(image=b) for b in blobs],
            ),
            timeout=60,
        )
        np.testing.assert_allclose(
            similarity.rows[0].scores, from_bytes @ from_bytes[0], atol=TOL, rtol=0
        )

        labels = ["a cat", "a cup of coffee", "a rocket"]
        by_bytes = await stub.Classify(
            clip_pb2.ClassifyRequest(images=blobs, labels=labels), timeout=60
        )
        by_pixels = await stub.Classify(
            clip_pb2.ClassifyRequest(pixels=pixels, labels=labels), timeout=60
        )
        _assert_same_labels(by_pixels, by_bytes)

        def stream() -> list[clip_pb2.StreamRequest]:
            return [
                clip_pb2.StreamRequest(id=str(i), pixels=p, format=1) for i, p in enumerate(pixels)
            ]

        answers = {a.id: a async for a in stub.EmbedStream(stream(), timeout=60)}
        streamed = np.stack(
            [decode_embedding(answers[str(i)].embedding) for i in range(len(blobs))]
        )
        np.testing.assert_allclose(streamed, from_bytes, atol=SAME, rtol=0)


async def test_wrong_pixel_lengths_are_invalid_argument_by_index(
    gateway: Gateway, photos: dict[str, Image.Image]
) -> None:
    recipe = await _recipe_of(gateway)
    good = image_pixels(encode(photos["chelsea"], "JPEG"), recipe.spec, recipe.limits)
    wrong = {
        "one short": good[:-1],
        "one long": good + b"\0",
        "an encoded image": encode(photos["chelsea"], "PNG"),
        "another size": bytes(224 * 224 * 3),
        "empty": b"",
    }
    async with stub_for(gateway.port) as stub:
        for case, bad in wrong.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.EmbedImage(clip_pb2.EmbedImageRequest(pixels=[good, bad]), timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
            assert "pixels[1]" in caught.value.details(), (case, caught.value.details())
            assert f"pixels are {len(bad)} bytes" in caught.value.details(), case
            assert "64x64 RGB uint8 pixels = 12288 bytes" in caught.value.details(), case
        # Images and pixels in one request: which order would the answer have?
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EmbedImage(
                clip_pb2.EmbedImageRequest(images=[encode(photos["coffee"])], pixels=[good]),
                timeout=30,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "send one kind per request" in caught.value.details()
        # A stream item with bad pixels gets its own error; the stream goes on.
        requests = [
            clip_pb2.StreamRequest(id="bad", pixels=good[:100]),
            clip_pb2.StreamRequest(id="good", pixels=good),
        ]
        answers = {a.id: a async for a in stub.EmbedStream(requests, timeout=30)}
        assert answers["bad"].error.code == "INVALID_ARGUMENT"
        assert "pixels are 100 bytes" in answers["bad"].error.message
        assert answers["good"].WhichOneof("result") == "embedding"
        # Classify refuses before embedding any label.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Classify(
                clip_pb2.ClassifyRequest(pixels=[good[:7]], labels=["a"]), timeout=30
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _recipe_of(gateway: Gateway) -> PixelRecipe:
    async with stub_for(gateway.port) as stub:
        return await _recipe(stub)


async def test_pixels_over_http_equal_the_encoded_image_and_bad_lengths_are_400(
    gateway: Gateway, photos: dict[str, Image.Image]
) -> None:
    blob = encode(photos["astronaut"], "JPEG", quality=85)
    recipe = await _recipe_of(gateway)
    pixels = image_pixels(blob, recipe.spec, recipe.limits)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{gateway.http_port}/v1", api_key="unused", max_retries=0
    )
    async with client:
        response = await client.embeddings.create(
            model="clip",
            input=[
                {"image": base64.b64encode(blob).decode()},
                {"pixels": base64.b64encode(pixels).decode()},
            ],  # type: ignore[list-item]
            encoding_format="float",
        )
        vectors = np.array([d.embedding for d in response.data], dtype=np.float32)
        np.testing.assert_allclose(vectors[0], vectors[1], atol=SAME, rtol=0)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(
                model="clip",
                input=[{"pixels": base64.b64encode(pixels[:-3]).decode()}],  # type: ignore[list-item]
            )
        assert caught.value.status_code == 400
        assert "input[0]" in caught.value.body["message"]
        assert "12288 bytes" in caught.value.body["message"]


def _png_of_length(length: int) -> bytes:
    """A valid PNG of exactly `length` bytes (a tEXt chunk pads it)."""
    import zlib

    png = encode(photo_like(24, 16, seed=8), "PNG")
    end = png.rindex(b"IEND") - 4
    pad = length - len(png) - 12 - 4  # chunk length, type, CRC; the keyword "pad" + NUL
    chunk = b"tEXt" + b"pad\0" + b"x" * pad
    body = (len(chunk) - 4).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big")
    out = png[:end] + body + png[end:]
    assert len(out) == length
    return out


async def test_pixel_and_encoded_keys_are_distinct_kinds_in_the_cache(
    demo_model: ExportedModel, photos: dict[str, Image.Image]
) -> None:
    """With the LRU on: an image's pixels are not served the vector cached for its encoded
    bytes (another key kind), and are cached under their own key."""
    blob = encode(photos["coffee"], "PNG")
    async with (
        running_gateway(gateway_settings(demo_model.repository)) as gw,
        stub_for(gw.port) as stub,
    ):
        recipe = await _recipe(stub)
        pixels = image_pixels(blob, recipe.spec, recipe.limits)
        first = await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[blob]), timeout=60)
        as_pixels = await stub.EmbedImage(clip_pb2.EmbedImageRequest(pixels=[pixels]), timeout=60)
        again = await stub.EmbedImage(clip_pb2.EmbedImageRequest(pixels=[pixels]), timeout=60)
        # An encoded image of exactly S·S·3 bytes, cached as an image, then sent as
        # pixels: the same bytes, another kind of input, so not the image's vector.
        twin = _png_of_length(12288)
        await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[twin]), timeout=60)
        as_image = await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[twin]), timeout=60)
        twin_pixels = await stub.EmbedImage(clip_pb2.EmbedImageRequest(pixels=[twin]), timeout=60)
    assert not first.embeddings[0].cached
    assert not as_pixels.embeddings[0].cached
    assert again.embeddings[0].cached
    assert as_image.embeddings[0].cached
    assert not twin_pixels.embeddings[0].cached
    assert (
        decode_embedding(twin_pixels.embeddings[0]).tobytes()
        != decode_embedding(as_image.embeddings[0]).tobytes()
    )
    assert (
        decode_embedding(as_pixels.embeddings[0]).tobytes()
        == decode_embedding(first.embeddings[0]).tobytes()
    )


async def test_the_python_client_sends_pixels_it_made_and_the_vectors_are_identical(
    gateway: Gateway, photos: dict[str, Image.Image]
) -> None:
    blobs = _blobs(photos)
    broken = [blobs[0], b"this is no image"]
    async with (
        AsyncClipClient(f"127.0.0.1:{gateway.port}") as plain,
        AsyncClipClient(f"127.0.0.1:{gateway.port}", local_preprocess=True, workers=2) as local,
    ):
        assert await plain.pixel_recipe() is None  # off unless asked for
        assert await local.pixel_recipe() is not None
        want = (await plain.embed_image(blobs)).vectors
        got = (await local.embed_image(blobs)).vectors
        np.testing.assert_allclose(got, want, atol=SAME, rtol=0)
        labels = ["a cat", "a rocket"]
        by_local = await local.classify(blobs, labels)
        by_plain = await plain.classify(blobs, labels)
        assert [[x.label for x in row] for row in by_local] == [
            [x.label for x in row] for row in by_plain
        ]
        np.testing.assert_allclose(
            [[x.score for x in row] for row in by_local],
            [[x.score for x in row] for row in by_plain],
            atol=SAME,
            rtol=0,
        )
        # An image the client cannot decode goes as its bytes: the server names it.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await local.embed_image(broken)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "images[1]" in caught.value.details()

    def sync_call() -> np.ndarray:
        with ClipClient(f"127.0.0.1:{gateway.port}", local_preprocess=True, workers=2) as client:
            return client.embed_image(blobs).vectors

    np.testing.assert_allclose(await asyncio.to_thread(sync_call), want, atol=SAME, rtol=0)
