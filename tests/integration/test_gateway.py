"""The gateway over real gRPC on loopback: every RPC, parity, batching, health, reflection."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import grpc
import numpy as np
import open_clip
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from service.api.clip.v1 import clip_pb2
from service.client import AsyncClipClient, ClipClient, decode_embedding
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample, scrape
from service.server.app import Gateway
from tests.support.gateway import stub_for
from tests.support.images import encode
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration

TOL = 1e-5


@pytest.fixture(scope="module")
async def gateway(demo_model: ExportedModel) -> AsyncIterator[Gateway]:
    async with running_gateway(gateway_settings(demo_model.repository)) as gw:
        yield gw


def _reference_texts(model: ExportedModel, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        tokens = open_clip.get_tokenizer(model.name)(texts)
        return model.clip.encode_text(tokens, normalize=True).numpy()


def _reference_images(model: ExportedModel, blobs: list[bytes]) -> np.ndarray:
    _, _, preprocess = open_clip.create_model_and_transforms(model.name, pretrained=None)
    batch = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in blobs])
    with torch.no_grad():
        return model.clip.encode_image(batch, normalize=True).numpy()


async def test_embed_text_equals_open_clip(gateway: Gateway, demo_model: ExportedModel) -> None:
    texts = ["a red circle", "", "a photo of a blue star", "ünïcödé 日本 🎉", "star " * 100]
    async with stub_for(gateway.port) as stub:
        response = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts))
    got = np.stack([decode_embedding(e) for e in response.embeddings])
    assert np.abs(got - _reference_texts(demo_model, texts)).max() <= TOL
    assert [e.truncated for e in response.embeddings] == [False, False, False, False, True]
    assert response.model == gateway.embedder.model_id
    assert all(e.dim == 64 for e in response.embeddings)


async def test_embed_image_equals_open_clip_for_every_format(
    gateway: Gateway, demo_model: ExportedModel, photos: dict[str, Image.Image]
) -> None:
    chelsea = photos["chelsea"]
    blobs = [
        encode(chelsea, "JPEG", quality=90),
        encode(photos["astronaut"], "PNG"),
        encode(photos["coffee"], "WEBP"),
        encode(photos["rocket"].convert("P"), "GIF"),
        encode(photos["camera"], "BMP"),
        encode(photos["china"], "TIFF"),
        encode(chelsea.resize((1, 1)), "PNG"),
        encode(chelsea.convert("RGBA"), "PNG"),
    ]
    async with stub_for(gateway.port) as stub:
        response = await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=blobs))
    got = np.stack([decode_embedding(e) for e in response.embeddings])
    assert got.shape == (len(blobs), 64)
    assert np.abs(got - _reference_images(demo_model, blobs)).max() <= TOL


async def test_packed_formats_carry_the_same_vector(gateway: Gateway) -> None:
    texts = ["a green hexagon"]
    async with stub_for(gateway.port) as stub:
        floats = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts))
        f32 = await stub.EmbedText(
            clip_pb2.EmbedTextRequest(texts=texts, format=clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES)
        )
        f16 = await stub.EmbedText(
            clip_pb2.EmbedTextRequest(texts=texts, format=clip_pb2.VECTOR_FORMAT_FLOAT16_BYTES)
        )
    reference = np.asarray(floats.embeddings[0].values, dtype=np.float32)
    assert not f32.embeddings[0].values and len(f32.embeddings[0].packed) == 4 * 64
    assert len(f16.embeddings[0].packed) == 2 * 64
    np.testing.assert_array_equal(np.frombuffer(f32.embeddings[0].packed, "<f4"), reference)
    np.testing.assert_allclose(np.frombuffer(f16.embeddings[0].packed, "<f2"), reference, atol=1e-3)
    np.testing.assert_array_equal(decode_embedding(f32.embeddings[0]), reference)


async def test_repeated_input_is_cached_and_identical(gateway: Gateway) -> None:
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        first = await client.embed_text(["a cached purple cross"])
        second = await client.embed_text(["a cached purple cross"])
    assert first.cached == [False] and second.cached == [True]
    np.testing.assert_array_equal(first.vectors, second.vectors)


async def test_similarity_mixes_texts_and_images(
    gateway: Gateway, photos: dict[str, Image.Image]
) -> None:
    image = encode(photos["chelsea"], "JPEG")
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        scores, probs = await client.similarity(
            ["a red circle", image], ["a blue square", image, "a cat"]
        )
        texts = await client.embed_text(["a red circle", "a blue square", "a cat"])
        images = await client.embed_image([image])
    queries = np.stack([texts.vectors[0], images.vectors[0]])
    candidates = np.stack([texts.vectors[1], images.vectors[0], texts.vectors[2]])
    expected = queries @ candidates.T
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert scores[1, 1] == pytest.approx(1.0, abs=1e-5)
    logits = gateway.embedder.metadata.logit_scale * expected
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, softmax / softmax.sum(1, keepdims=True), atol=1e-5)


async def test_classify_ranks_labels_and_reuses_label_sets(
    gateway: Gateway, photos: dict[str, Image.Image]
) -> None:
    images = [encode(photos["chelsea"], "PNG"), encode(photos["rocket"], "PNG")]
    labels = ["red circle", "blue star", "green square", "white hexagon"]
    templates = ["a photo of a {}.", "a drawing of a {}."]
    text_batches = "clip_backend_duration_seconds_count"
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        full = await client.classify(images, labels, templates=templates)
        before = sample(
            scrape(gateway.metrics_port), text_batches, backend="embedded", modality="text"
        )
        top = await client.classify(images, labels, templates=templates, top_k=2)
        after = sample(
            scrape(gateway.metrics_port), text_batches, backend="embedded", modality="text"
        )
        img = await client.embed_image(images)
        prompts = await client.embed_text([t.replace("{}", lb) for lb in labels for t in templates])
    assert after == before, "a repeated label set must not be embedded again"
    for result in full:
        assert [r.label for r in result] != [] and len(result) == 4
        probs = [r.probability for r in result]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert [[r.label for r in t] for t in top] == [[r.label for r in f[:2]] for f in full]
    # Each label: normalized mean of its template embeddings; score = cosine with the image.
    per_label = prompts.vectors.reshape(len(labels), len(templates), -1).mean(axis=1)
    per_label /= np.linalg.norm(per_label, axis=1, keepdims=True)
    cos = img.vectors @ per_label.T
    for i, result in enumerate(full):
        for r in result:
            assert r.score == pytest.approx(float(cos[i, labels.index(r.label)]), abs=1e-5)


async def test_model_info(gateway: Gateway) -> None:
    def call() -> clip_pb2.ModelInfo:
        # The blocking client runs in a thread: the server shares this event loop.
        with ClipClient(f"127.0.0.1:{gateway.port}") as client:
            return client.model_info()

    info = await asyncio.to_thread(call)
    assert info.model_name == "clip-demo-shapes"
    assert info.embedding_dim == 64 and info.image_size == 64 and info.context_length == 77
    assert info.backend == "embedded"
    assert info.logit_scale == pytest.approx(gateway.embedder.metadata.logit_scale)
    assert info.model_id == gateway.embedder.model_id


async def test_embed_stream_answers_every_item_and_survives_bad_ones(
    gateway: Gateway, photos: dict[str, Image.Image]
) -> None:
    good_image = encode(photos["coffee"], "JPEG")
    requests = [clip_pb2.StreamRequest(id=f"t{i}", text=f"a text number {i}") for i in range(20)]
    requests += [
        clip_pb2.StreamRequest(id="bad-image", image=b"not an image"),
        clip_pb2.StreamRequest(id="empty"),
        clip_pb2.StreamRequest(id="img", image=good_image),
        clip_pb2.StreamRequest(id="after", text="still going"),
    ]

    async def feed() -> AsyncIterator[clip_pb2.StreamRequest]:
        for request in requests:
            yield request

    answers = {}
    async with stub_for(gateway.port) as stub:
        async for answer in stub.EmbedStream(feed()):
            if answer.WhichOneof("result") == "embedding":
                answers[answer.id] = (decode_embedding(answer.embedding), None)
            else:
                answers[answer.id] = (None, f"{answer.error.code}: {answer.error.message}")
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        direct = await client.embed_image([good_image])
        pairs = [(str(i), b) for i, b in enumerate([good_image, b"junk"])] + [("t", "hello")]
        via_client = {i: (v, e) async for i, v, e in client.embed_stream(pairs)}
    assert set(answers) == {r.id for r in requests}
    assert answers["bad-image"][0] is None and "INVALID_ARGUMENT" in answers["bad-image"][1]
    assert "neither text nor image" in answers["empty"][1]
    np.testing.assert_array_equal(answers["img"][0], direct.vectors[0])
    assert answers["after"][1] is None and answers["t7"][0].shape == (64,)
    np.testing.assert_array_equal(via_client["0"][0], direct.vectors[0])
    assert via_client["1"][0] is None and via_client["1"][1].startswith("INVALID_ARGUMENT")
    assert via_client["t"][0].shape == (64,)


async def test_concurrent_single_calls_are_batched(gateway: Gateway) -> None:
    count = "clip_batch_size_count"
    total = "clip_batch_size_sum"
    before = scrape(gateway.metrics_port)
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        rng = np.random.default_rng(7)
        blobs = [
            encode(Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)))
            for _ in range(48)
        ]
        await asyncio.gather(*(client.embed_image([b]) for b in blobs))
    after = scrape(gateway.metrics_port)
    batches = sample(after, count, modality="image") - sample(before, count, modality="image")
    rows = sample(after, total, modality="image") - sample(before, total, modality="image")
    assert rows == 48
    assert batches < 48 / 2, f"48 concurrent calls ran as {batches} batches"


async def test_health_and_reflection(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "clip.v1.ClipService", "liveness"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = []
        async for reply in reflection.ServerReflectionInfo(ask()):
            names = [s.name for s in reply.list_services_response.service]
    assert "clip.v1.ClipService" in names and "grpc.health.v1.Health" in names


async def test_deadline_shorter_than_the_work(
    gateway: Gateway, photos: dict[str, Image.Image]
) -> None:
    blobs = [encode(photos["astronaut"].rotate(i), "PNG") for i in range(64)]
    async with stub_for(gateway.port) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=blobs), timeout=0.02)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        ok = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=["still fine"]), timeout=30)
    assert len(ok.embeddings) == 1
