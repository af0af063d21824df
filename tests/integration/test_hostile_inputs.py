"""Hostile and edge-case inputs: each gets its expected code, fast, and the server stays well.

Limits here are the production defaults except the message size (kept small so the
"over the gRPC size limit" case stays cheap).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from service.api.clip.v1 import clip_pb2
from service.client import decode_embedding
from service.processes.gateway import gateway_settings, running_gateway
from service.server.app import Gateway
from tests.support import hostile_inputs as h
from tests.support.gateway import stub_for
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration

OK = grpc.StatusCode.OK
BAD = grpc.StatusCode.INVALID_ARGUMENT
BIG = grpc.StatusCode.RESOURCE_EXHAUSTED
MAX_MESSAGE = 8 * 1024 * 1024
MAX_IMAGE_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
async def gateway(demo_model: ExportedModel) -> AsyncIterator[Gateway]:
    settings = gateway_settings(
        demo_model.repository,
        max_message_bytes=MAX_MESSAGE,
        max_image_bytes=MAX_IMAGE_BYTES,
    )
    async with running_gateway(settings) as gw:
        yield gw


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    request: Callable[[], object]
    code: grpc.StatusCode
    says: str = ""  # substring the error message must contain


def _img(*blobs: bytes) -> Callable[[], object]:
    return lambda: clip_pb2.EmbedImageRequest(images=list(blobs))


def _txt(*texts: str) -> Callable[[], object]:
    return lambda: clip_pb2.EmbedTextRequest(texts=list(texts))


def _cls(labels: list[str], templates: list[str] = (), top_k: int = 0) -> Callable[[], object]:
    image = encode(photo_like(64, 64), "PNG")
    return lambda: clip_pb2.ClassifyRequest(
        images=[image], labels=labels, templates=list(templates), top_k=top_k
    )


JPEG = encode(photo_like(), "JPEG")
PNG = encode(photo_like(), "PNG")
CASES = [
    Case("empty image bytes", "EmbedImage", _img(b""), BAD, "images[0]: image is empty"),
    Case(
        "random bytes",
        "EmbedImage",
        _img(np.random.default_rng(1).bytes(5000)),
        BAD,
        "images[0]: not a decodable image",
    ),
    Case(
        "truncated jpeg",
        "EmbedImage",
        _img(PNG, h.truncated(JPEG)),
        BAD,
        "images[1]: image data is corrupt or truncated",
    ),
    Case("truncated png", "EmbedImage", _img(h.truncated(PNG, 0.3)), BAD, "images[0]"),
    Case(
        "png header then garbage",
        "EmbedImage",
        _img(PNG[:33] + b"\x00garbage" * 50),
        BAD,
        "images[0]",
    ),
    Case(
        "decompression bomb",
        "EmbedImage",
        _img(h.png_bomb()),
        BAD,
        "over the limit of 50000000 pixels",
    ),
    Case(
        "large canvas under PIL's own guard",
        "EmbedImage",
        _img(h.png_bomb(9000, 9000)),
        BAD,
        "9000x9000 = 81000000 pixels, over the limit of 50000000 pixels",
    ),
    Case(
        "over the byte limit",
        "EmbedImage",
        _img(b"\xff" * (MAX_IMAGE_BYTES + 1)),
        BAD,
        "over the limit of 4194304 bytes",
    ),
    Case("1x1", "EmbedImage", _img(encode(photo_like(1, 1), "PNG")), OK),
    Case("1x20000", "EmbedImage", _img(encode(photo_like(1, 20000), "PNG")), OK),
    Case("20000x1", "EmbedImage", _img(encode(photo_like(20000, 1), "PNG")), OK),
    Case("animated gif", "EmbedImage", _img(h.animated_gif()[0]), OK),
    Case("multi-page tiff", "EmbedImage", _img(h.multipage_tiff()[0]), OK),
    Case("cmyk jpeg", "EmbedImage", _img(encode(photo_like().convert("CMYK"), "JPEG")), OK),
    Case("16-bit png", "EmbedImage", _img(h.sixteen_bit_png()), OK),
    Case("palette with transparency", "EmbedImage", _img(h.palette_with_transparency()), OK),
    Case("exif-rotated jpeg", "EmbedImage", _img(h.exif_rotated_jpeg()[0]), OK),
    Case("svg", "EmbedImage", _img(h.SVG), BAD, "not a decodable image"),
    Case("pdf", "EmbedImage", _img(h.PDF), BAD, "not a decodable image"),
    Case(
        "ico (decodable, not accepted)",
        "EmbedImage",
        _img(h.ico()),
        BAD,
        "format ICO is not supported",
    ),
    Case("no images", "EmbedImage", _img(), BAD, "no images given"),
    Case("empty text", "EmbedText", _txt(""), OK),
    Case(
        "1 MB text",
        "EmbedText",
        _txt("ok", "x" * 1_000_000),
        BAD,
        "texts[1]: text is 1000000 characters",
    ),
    Case("10,000 texts", "EmbedText", _txt(*["t"] * 10_000), BAD, "10000 texts in one request"),
    Case("no texts", "EmbedText", _txt(), BAD, "no texts given"),
    Case("control characters", "EmbedText", _txt("\x00\x01\x1b[31m\x7f\u200b\ufeff"), OK),
    Case("mixed scripts", "EmbedText", _txt("Ελληνικά English 中文 עברית हिन्दी 🎉"), OK),
    Case("no labels", "Classify", _cls([]), BAD, "no labels given"),
    Case(
        "10,000 labels",
        "Classify",
        _cls([f"l{i}" for i in range(10_000)]),
        BAD,
        "10000 labels in one request",
    ),
    Case(
        "duplicate labels",
        "Classify",
        _cls(["cat", "dog", "cat"]),
        BAD,
        "labels[2]: label 'cat' repeats labels[0]",
    ),
    Case("empty label", "Classify", _cls(["cat", " "]), BAD, "labels[1]: label is empty"),
    Case("template without {}", "Classify", _cls(["cat"], ["a photo"]), BAD, "templates[0]"),
    Case("template with two {}", "Classify", _cls(["cat"], ["a {} and a {}"]), BAD, "found 2"),
    Case("negative top_k", "Classify", _cls(["cat", "dog"], top_k=-1), BAD, "top_k is -1"),
    Case("huge top_k", "Classify", _cls(["cat", "dog"], top_k=2**31 - 1), OK),
    Case(
        "classify without images",
        "Classify",
        lambda: clip_pb2.ClassifyRequest(labels=["cat"]),
        BAD,
        "no images given",
    ),
    Case(
        "similarity without candidates",
        "Similarity",
        lambda: clip_pb2.SimilarityRequest(queries=[clip_pb2.Item(text="q")]),
        BAD,
        "no candidates given",
    ),
    Case(
        "similarity item without kind",
        "Similarity",
        lambda: clip_pb2.SimilarityRequest(
            queries=[clip_pb2.Item(text="q")], candidates=[clip_pb2.Item(text="c"), clip_pb2.Item()]
        ),
        BAD,
        "candidates[1]: item has neither text nor image",
    ),
    Case(
        "similarity bad image names its index",
        "Similarity",
        lambda: clip_pb2.SimilarityRequest(
            queries=[clip_pb2.Item(text="q")],
            candidates=[clip_pb2.Item(text="c"), clip_pb2.Item(image=b"junk")],
        ),
        BAD,
        "candidates[1]: not a decodable image",
    ),
    Case("message over the gRPC size limit", "EmbedText", _txt("y" * (MAX_MESSAGE + 10)), BIG),
]


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def _good_call(stub: object) -> np.ndarray:
    response = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=["a blue star"]), timeout=30)
    return decode_embedding(response.embeddings[0])


async def test_hostile_corpus(gateway: Gateway) -> None:
    assert len(CASES) >= 25
    async with stub_for(gateway.port) as stub:
        baseline = await _good_call(stub)
        for case in CASES:  # warm every path once so the memory check sees steady state
            request = case.request()
            try:
                await getattr(stub, case.method)(request, timeout=30)
            except grpc.aio.AioRpcError:
                pass
        rss_before = _rss_bytes()
        failures = []
        for case in CASES:
            request = case.request()
            started = time.perf_counter()
            code, details = OK, ""
            try:
                await getattr(stub, case.method)(request, timeout=30)
            except grpc.aio.AioRpcError as err:
                code, details = err.code(), err.details() or ""
            took = time.perf_counter() - started
            if code != case.code or case.says not in details or took > 10:
                failures.append(f"{case.name}: {code.name} {details!r} in {took:.1f}s")
        assert not failures, "\n".join(failures)
        # Afterwards: healthy, same answers, memory back near where it was.
        assert gateway.health.serving
        np.testing.assert_array_equal(await _good_call(stub), baseline)
    grown = _rss_bytes() - rss_before
    assert grown < 150 * 1024 * 1024, f"RSS grew by {grown / 1e6:.0f} MB"


async def test_first_frame_and_exif_rules(gateway: Gateway) -> None:
    gif, gif_first = h.animated_gif()
    tiff, tiff_first = h.multipage_tiff()
    rotated, upright = h.exif_rotated_jpeg()
    async with stub_for(gateway.port) as stub:
        response = await stub.EmbedImage(
            clip_pb2.EmbedImageRequest(images=[gif, gif_first, tiff, tiff_first, rotated, upright])
        )
    vectors = [decode_embedding(e) for e in response.embeddings]
    # Same pixels; rows of one batch may differ in the last bits (BLAS blocking).
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    np.testing.assert_allclose(vectors[2], vectors[3], atol=1e-6)
    np.testing.assert_allclose(vectors[4], vectors[5], atol=1e-6)
    assert np.abs(vectors[0] - vectors[2]).max() > 1e-3  # and different images differ


async def test_burst_of_bad_requests_leaves_the_server_correct(gateway: Gateway) -> None:
    bad = [case for case in CASES if case.code != OK and case.method != "Classify"]
    async with stub_for(gateway.port) as stub:
        baseline = await _good_call(stub)

        async def fire(case: Case) -> grpc.StatusCode:
            try:
                await getattr(stub, case.method)(case.request(), timeout=30)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return OK

        codes = await asyncio.gather(*(fire(bad[i % len(bad)]) for i in range(120)))
        assert OK not in codes
        assert gateway.health.serving
        np.testing.assert_array_equal(await _good_call(stub), baseline)
