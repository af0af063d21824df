"""Compact vectors end to end: every format over real gRPC (EmbedText, EmbedImage,
EmbedStream), the Python client, `clipsvc`, and HTTP with the official `openai` client;
each checked against references computed here (numpy's packbits, the per-vector int8
scale) from open_clip's own float32 vectors; the cache holds float32 once."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator

import grpc
import numpy as np
import openai
import pytest

from service.api.clip.v1 import clip_pb2
from service.client import AsyncClipClient, decode_embedding
from service.processes.gateway import gateway_settings, running_gateway
from service.server.app import Gateway
from tests.support.gateway import stub_for
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.reference import reference_images, reference_texts

pytestmark = pytest.mark.integration

TOL = 1e-5
COMPACT = {
    "int8": clip_pb2.VECTOR_FORMAT_INT8,
    "uint8": clip_pb2.VECTOR_FORMAT_UINT8,
    "binary": clip_pb2.VECTOR_FORMAT_BINARY,
    "ubinary": clip_pb2.VECTOR_FORMAT_UBINARY,
}


def expected(floats: np.ndarray, fmt: str) -> np.ndarray:
    """The README's rules, written out independently of `service.core.vector_formats`."""
    if fmt in ("ubinary", "binary"):
        bits = np.packbits(floats > 0, axis=-1)
        return bits if fmt == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)
    ints = np.rint(floats * 127 / np.abs(floats).max(axis=-1, keepdims=True)).astype(np.int16)
    return ints.astype(np.int8) if fmt == "int8" else (ints + 128).astype(np.uint8)


def assert_quantized(values: np.ndarray, floats: np.ndarray, fmt: str) -> None:
    """`values` are `floats` in `fmt`; an int8 step may differ where a float sits within
    the 1e-5 parity tolerance of a rounding edge (never seen; allowed, not more)."""
    want = expected(floats, fmt)
    assert values.dtype == want.dtype and values.shape == want.shape
    if fmt in ("int8", "uint8"):
        assert np.abs(values.astype(np.int16) - want.astype(np.int16)).max() <= 1
        assert (values != want).mean() < 0.01
    else:
        np.testing.assert_array_equal(values, want)


async def test_embed_text_and_image_answer_every_compact_format(
    gateway: Gateway, demo_model: ExportedModel
) -> None:
    texts = ["a red circle", "a photo of a blue star", "green hexagon on a background"]
    images = [encode(photo_like(90, 70, seed=s), "PNG") for s in (1, 2)]
    want_texts = reference_texts(demo_model, texts)
    want_images = reference_images(demo_model, images)
    dim = want_texts.shape[1]
    async with stub_for(gateway.port) as stub:
        for name, fmt in COMPACT.items():
            answer = await stub.EmbedText(
                clip_pb2.EmbedTextRequest(texts=texts, format=fmt), timeout=60
            )
            assert [e.format for e in answer.embeddings] == [fmt] * len(texts)
            assert all(e.dim == dim and not e.values for e in answer.embeddings)
            got = np.stack([decode_embedding(e) for e in answer.embeddings])
            assert_quantized(got, want_texts, name)
            answer = await stub.EmbedImage(
                clip_pb2.EmbedImageRequest(images=images, format=fmt), timeout=60
            )
            got = np.stack([decode_embedding(e) for e in answer.embeddings])
            assert_quantized(got, want_images, name)
            width = dim if name.endswith("int8") else (dim + 7) // 8
            assert all(len(e.packed) == width for e in answer.embeddings)


async def test_embed_stream_answers_each_item_in_its_own_format(
    gateway: Gateway, demo_model: ExportedModel
) -> None:
    text = "a white cross"
    want = reference_texts(demo_model, [text])[0]
    formats = {"f": clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES, **COMPACT}

    async def requests() -> AsyncIterator[clip_pb2.StreamRequest]:
        for item_id, fmt in formats.items():
            yield clip_pb2.StreamRequest(id=item_id, text=text, format=fmt)

    async with stub_for(gateway.port) as stub:
        answers = {a.id: a async for a in stub.EmbedStream(requests(), timeout=60)}
    assert set(answers) == set(formats)
    np.testing.assert_allclose(decode_embedding(answers["f"].embedding), want, atol=TOL)
    for name in COMPACT:
        assert answers[name].embedding.format == COMPACT[name]
        assert_quantized(decode_embedding(answers[name].embedding), want, name)


async def test_the_cache_keeps_float32_once_and_each_answer_is_quantized_from_it(
    gateway: Gateway, demo_model: ExportedModel
) -> None:
    text = "a purple triangle seen once by the cache test"
    want = reference_texts(demo_model, [text])[0]
    async with stub_for(gateway.port) as stub:

        async def ask(fmt: int) -> clip_pb2.Embedding:
            answer = await stub.EmbedText(
                clip_pb2.EmbedTextRequest(texts=[text], format=fmt), timeout=60
            )
            return answer.embeddings[0]

        first = await ask(clip_pb2.VECTOR_FORMAT_UBINARY)  # a miss, answered as bits
        assert not first.cached
        assert_quantized(decode_embedding(first), want, "ubinary")
        # Then hits in other formats: the cached vector is the float32 one, not the bits
        # or int8 values a compact answer carried.
        floats = await ask(clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES)
        assert floats.cached
        np.testing.assert_allclose(decode_embedding(floats), want, atol=TOL)
        for name, fmt in COMPACT.items():
            hit = await ask(fmt)
            assert hit.cached
            np.testing.assert_array_equal(
                decode_embedding(hit), expected(decode_embedding(floats), name)
            )
        listed = await ask(clip_pb2.VECTOR_FORMAT_FLOAT_LIST)
        assert listed.cached and listed.format == clip_pb2.VECTOR_FORMAT_FLOAT_LIST
        np.testing.assert_array_equal(decode_embedding(listed), decode_embedding(floats))


async def test_an_unknown_format_number_is_invalid_argument_naming_the_formats(
    gateway: Gateway,
) -> None:
    async with stub_for(gateway.port) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=["x"], format=99), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown vector format 99" in (caught.value.details() or "")
    assert "VECTOR_FORMAT_UBINARY" in (caught.value.details() or "")


async def test_a_compact_answer_fits_where_float32_would_pass_the_send_limit(
    demo_model: ExportedModel,
) -> None:
    # 64 dims: float32 is 256 bytes a vector, ubinary 8. 200 texts: ~56 KB against ~6 KB.
    settings = gateway_settings(demo_model.repository, max_message_bytes=32 * 1024)
    texts = [f"a red circle number {i}" for i in range(200)]
    async with running_gateway(settings) as gw, stub_for(gw.port) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EmbedText(
                clip_pb2.EmbedTextRequest(texts=texts, format=clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES),
                timeout=60,
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        answer = await stub.EmbedText(
            clip_pb2.EmbedTextRequest(texts=texts, format=clip_pb2.VECTOR_FORMAT_UBINARY),
            timeout=120,
        )
    assert len(answer.embeddings) == len(texts)
    assert all(len(e.packed) == 8 for e in answer.embeddings)


async def test_the_python_client_decodes_each_format(
    gateway: Gateway, demo_model: ExportedModel
) -> None:
    texts = ["a black star", "an orange square"]
    want = reference_texts(demo_model, texts)
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        floats = await client.embed_text(texts)
        np.testing.assert_allclose(floats.vectors, want, atol=TOL)
        for name in COMPACT:
            got = await client.embed_text(texts, vector_format=name)
            assert_quantized(got.vectors, want, name)
            assert got.cached == [True, True]  # the float32 call above filled the cache
        streamed = {
            item_id: vector
            async for item_id, vector, error in client.embed_stream(
                [("0", texts[0]), ("1", texts[1])], vector_format="binary"
            )
        }
        np.testing.assert_array_equal(
            np.stack([streamed["0"], streamed["1"]]), expected(floats.vectors, "binary")
        )
        with pytest.raises(ValueError, match="unknown vector_format 'int4'"):
            await client.embed_text(texts, vector_format="int4")


async def test_clipsvc_embed_text_prints_the_format_it_was_asked_for(
    gateway: Gateway, demo_model: ExportedModel
) -> None:
    import asyncio

    text = "a yellow square"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        "embed-text",
        "--target",
        f"127.0.0.1:{gateway.port}",
        "--vector-format",
        "ubinary",
        "--full",
        text,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode == 0, err.decode()
    (line,) = [json.loads(row) for row in out.decode().splitlines()]
    want = expected(reference_texts(demo_model, [text])[0], "ubinary")
    assert line["vector"] == want.tolist()


def _openai(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{gw.http_port}/v1", api_key="unused", max_retries=0
    )


async def test_http_encoding_format_carries_every_compact_format_through_openai(
    gateway: Gateway, demo_model: ExportedModel
) -> None:
    texts = ["a red circle", "a green star"]
    want = reference_texts(demo_model, texts)
    async with _openai(gateway) as client:
        for name in COMPACT:
            # The client types encoding_format as "float" | "base64" but sends any value
            # and, when one is given, hands the answer back untouched.
            raw = await client.embeddings.with_raw_response.create(
                model="clip",
                input=texts,
                encoding_format=name,  # type: ignore[arg-type]
            )
            # On the wire: JSON integers (the client's model then holds them as floats).
            sent = [d["embedding"] for d in raw.http_response.json()["data"]]
            assert all(type(v) is int for row in sent for v in row)
            answer = raw.parse()
            assert [d.index for d in answer.data] == [0, 1]
            values = np.array([d.embedding for d in answer.data])
            np.testing.assert_array_equal(values, sent)
            assert_quantized(values.astype(expected(want, name).dtype), want, name)
        # float after the compact answers: the cache still holds the float32 vectors.
        answer = await client.embeddings.create(model="clip", input=texts)
        np.testing.assert_allclose([d.embedding for d in answer.data], want, atol=TOL)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(
                model="clip",
                input=texts,
                encoding_format="int4",  # type: ignore[arg-type]
            )
    assert caught.value.status_code == 400
    assert "ubinary" in str(caught.value) and "encoding_format" in str(caught.value)
