"""The gateway over real gRPC on loopback: every RPC, parity, batching, health, reflection."""

from __future__ import annotations

import asyncio
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
from service.processes.gateway import gateway_settings
from service.processes.metric_samples import sample, scrape
from service.server.app import Gateway
from tests.support.gate import Gate, gated_gateway
from tests.support.gateway import stub_for
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.polling import eventually
from tests.support.reference import reference_images, reference_texts

pytestmark = pytest.mark.integration

TOL = 1e-5


async def test_embed_text_equals_open_clip(gateway: Gateway, demo_model: ExportedModel) -> None:
    texts = ["a red circle", "", "a photo of a blue star", "ünïcödé 日本 🎉", "star " * 100]
    async with stub_for(gateway.port) as stub:
        response = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts))
    got = np.stack([decode_embedding(e) for e in response.embeddings])
    assert np.abs(got - reference_texts(demo_model, texts)).max() <= TOL
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
    assert np.abs(got - reference_images(demo_model, blobs)).max() <= TOL


async def test_packed_formats_carry_the_same_vector(
    gateway: Gateway, photos: dict[str, Image.Image]
) -> None:
    """float32 bytes are the vector; float16 bytes are exactly that vector cast to '<f2'."""
    texts = ["a green hexagon", "a photo of a blue star"]
    images = [encode(photos["chelsea"], "JPEG"), encode(photos["coffee"].resize((90, 60)), "PNG")]
    f32, f16 = clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES, clip_pb2.VECTOR_FORMAT_FLOAT16_BYTES
    async with stub_for(gateway.port) as stub:
        answers = {}
        for fmt in (clip_pb2.VECTOR_FORMAT_FLOAT_LIST, f32, f16):
            text_answer = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts, format=fmt))
            image_request = clip_pb2.EmbedImageRequest(images=images, format=fmt)
            image_answer = await stub.EmbedImage(image_request)
            answers[fmt] = [*text_answer.embeddings, *image_answer.embeddings]
    for floats, packed32, packed16 in zip(*answers.values(), strict=True):
        reference = np.asarray(floats.values, dtype=np.float32)
        assert reference.shape == (64,) and not floats.packed
        assert not packed32.values and len(packed32.packed) == 4 * 64 and packed32.dim == 64
        assert not packed16.values and len(packed16.packed) == 2 * 64 and packed16.dim == 64
        np.testing.assert_array_equal(np.frombuffer(packed32.packed, "<f4"), reference)
        # Exactly the float32 vector rounded to half precision, byte for byte.
        assert packed16.packed == reference.astype("<f2").tobytes()
        # The client decodes each format back to float32 with nothing lost or added.
        np.testing.assert_array_equal(decode_embedding(packed32), reference)
        decoded16 = decode_embedding(packed16)
        assert decoded16.dtype == np.float32
        np.testing.assert_array_equal(decoded16, reference.astype("<f2").astype(np.float32))
        assert 0 < np.abs(decoded16 - reference).max() <= 1e-3  # half precision, not float32


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


# CLIP's 7 best ImageNet templates plus "a photo of a {}." (README, "Zero-shot"): written
# out here, not imported, so a changed default ensemble fails this test.
CLIP_DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def _open_clip_zero_shot(
    model: ExportedModel, blobs: list[bytes], labels: list[str], templates: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, float]:
    """(cosines, probabilities `[images, labels]`, logit scale) from open_clip itself."""
    tokenizer = open_clip.get_tokenizer(model.name)
    with torch.no_grad():
        per_label = []
        for label in labels:
            prompts = [template.replace("{}", label) for template in templates]
            vectors = model.clip.encode_text(tokenizer(prompts), normalize=True)
            mean = vectors.mean(dim=0)
            per_label.append(mean / mean.norm())
        label_matrix = torch.stack(per_label).double().numpy()
        logit_scale = float(model.clip.logit_scale.exp())
    cos = reference_images(model, blobs).astype(np.float64) @ label_matrix.T
    logits = logit_scale * cos
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return cos, exp / exp.sum(axis=1, keepdims=True), logit_scale


@pytest.mark.parametrize(
    "templates",
    [(), ("a photo of a {}.", "a drawing of a {}.", "{}")],
    ids=["default-ensemble", "three-templates"],
)
async def test_classify_is_softmax_of_scaled_cosine_with_open_clip_vectors(
    gateway: Gateway,
    demo_model: ExportedModel,
    photos: dict[str, Image.Image],
    templates: tuple[str, ...],
) -> None:
    from service.core.scoring import DEFAULT_TEMPLATES
    from service.demo.shapes import TRAIN_PAIRS, make_eval_set

    assert DEFAULT_TEMPLATES == CLIP_DEFAULT_TEMPLATES
    shapes, _ = make_eval_set(4321, 1, TRAIN_PAIRS[:3])
    blobs = [encode(image, "PNG") for image in shapes] + [encode(photos["chelsea"], "PNG")]
    labels = [f"{c} {s}" for c, s in TRAIN_PAIRS[:3]] + ["white hexagon", "green star"]
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        results = await client.classify(blobs, labels, templates=templates)
    cos, probs, logit_scale = _open_clip_zero_shot(
        demo_model, blobs, labels, templates or CLIP_DEFAULT_TEMPLATES
    )
    # Vectors agree with open_clip within 1e-5, so cosines within ~2e-5 (3e-5 allowed) and
    # logits within logit_scale times that. The demo model is sure of its answers (top
    # probabilities near 1), so probabilities are compared as log-ratios, where a wrong
    # scale, template ensemble or normalization shows however sure the model is.
    logit_tol = 2 * logit_scale * 3e-5
    compared = 0
    for i, ranked in enumerate(results):
        assert sorted(r.label for r in ranked) == sorted(labels)
        got = np.array([r.probability for r in ranked], dtype=np.float64)
        assert list(got) == sorted(got, reverse=True)
        assert got.sum() == pytest.approx(1.0, abs=1e-5)
        want = probs[i, [labels.index(r.label) for r in ranked]]
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(
            [r.score for r in ranked], cos[i, [labels.index(r.label) for r in ranked]], atol=3e-5
        )
        visible = want > 1e-30  # float32 holds these with full relative precision
        log_ratio = np.log(got[visible]) - np.log(want[visible])
        assert np.abs(log_ratio - log_ratio[0]).max() <= logit_tol, (i, log_ratio)
        compared += int(visible.sum()) - 1
    assert compared >= 2 * len(results), "too few labels to compare ratios on"


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
            # Watch too: a streaming handler that writes with context.write, through the
            # same interceptors as the ClipService calls.
            watch = health.Watch(health_pb2.HealthCheckRequest(service=service))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = []
        async for reply in reflection.ServerReflectionInfo(ask()):
            names = [s.name for s in reply.list_services_response.service]
    assert "clip.v1.ClipService" in names and "grpc.health.v1.Health" in names


async def _embed_image_codes_since(before: dict[str, float], metrics_port: int) -> dict[str, float]:
    """EmbedImage calls counted by code since `before`, once at least one is counted."""

    def counted() -> dict[str, float]:
        after = scrape(metrics_port)
        return {
            code: sample(after, "clip_requests_total", method="EmbedImage", code=code)
            - sample(before, "clip_requests_total", method="EmbedImage", code=code)
            for code in ("OK", "DEADLINE_EXCEEDED", "CANCELLED")
        }

    return await eventually(
        counted, lambda c: sum(c.values()) >= 1, what="the call counted", blocking=True
    )


async def test_a_caller_that_gives_up_is_counted_cancelled(demo_model: ExportedModel) -> None:
    """A cancel long before the deadline is CANCELLED in the metrics, not DEADLINE_EXCEEDED."""
    gate = Gate()
    settings = gateway_settings(demo_model.repository)
    blob = encode(photo_like(64, 48, seed=45), "PNG")
    async with gated_gateway(settings, gate) as gw, stub_for(gw.port) as stub:
        before = await asyncio.to_thread(scrape, gw.metrics_port)
        gate.close()
        call = stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[blob]), timeout=600)
        await eventually(lambda: gate.waiting == 1, what="the call held at the backend")
        call.cancel()

        codes = await _embed_image_codes_since(before, gw.metrics_port)
        gate.open()
    assert codes == {"OK": 0, "DEADLINE_EXCEEDED": 0, "CANCELLED": 1}, codes


async def test_deadline_shorter_than_the_work(demo_model: ExportedModel) -> None:
    """The gateway, not only the client library, honours the caller's deadline.

    The forward pass is held at a gate that never opens during the call, so the work
    cannot finish in time on any machine. Then, on the server's side: the backend call
    was given the caller's remaining time (not `--backend-timeout-s`, an hour here), and
    the gateway let go of the work at the deadline (admission released) while the
    backend call is still held.
    """
    gate = Gate()
    settings = gateway_settings(demo_model.repository, backend_timeout_s=3600.0)
    blob = encode(photo_like(120, 90, seed=44), "PNG")
    # Long enough to outlast decode and the batching queue on a slow loaded machine (tens
    # of ms here), so the call is held at the gate before its deadline passes; only the
    # closed gate can make it miss the deadline, so a longer one costs time, not coverage.
    deadline_s = 10.0
    async with gated_gateway(settings, gate) as gw, stub_for(gw.port) as stub:
        before = await asyncio.to_thread(scrape, gw.metrics_port)
        warm_up_calls = len(gate.gated_calls())
        gate.close()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[blob]), timeout=deadline_s)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(gate.gated_calls()) == warm_up_calls + 1, (
            f"the call never reached the backend gate within its {deadline_s} s deadline: "
            f"{gate.calls}"
        )
        held = gate.gated_calls()[-1]
        assert held.rows == 1 and gate.waiting == 1, gate.calls
        # The caller's time, not --backend-timeout-s (an hour). gRPC core may round the
        # `grpc-timeout` header up ("encoding may round up arbitrarily",
        # timeout_encoding.h): a CI run saw the server's deadline 10.0955 s for 10 s.
        assert held.timeout_s is not None and 0 < held.timeout_s <= deadline_s + 0.5, held

        # At the deadline the gateway stops waiting; one that ignored the deadline would
        # hold the item for the hour of --backend-timeout-s.
        await eventually(lambda: gw.embedder.admitted == 0, what="the work let go of")
        assert gate.waiting == 1, "released only because the backend finished"

        codes = await _embed_image_codes_since(before, gw.metrics_port)
        # Counted as what the caller saw, whichever side noticed the deadline first.
        assert codes == {"OK": 0, "DEADLINE_EXCEEDED": 1, "CANCELLED": 0}, codes
        gate.open()
        ok = await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[blob]), timeout=60)
    assert len(ok.embeddings) == 1 and not ok.embeddings[0].cached


async def test_not_serving_until_the_warm_up_inference_has_run(demo_model: ExportedModel) -> None:
    """Health is NOT_SERVING while the warm-up forward pass has not run; liveness is SERVING."""
    gate = Gate(closed=True)  # the warm-up's image forward pass waits here
    settings = gateway_settings(demo_model.repository)
    async with gated_gateway(settings, gate, wait_serving=False) as gw:
        await gate.wait_waiting(1)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                return reply.status

            serving = health_pb2.HealthCheckResponse.SERVING
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            # Several probes while held: the health loop's own attempts change nothing.
            for _ in range(3):
                assert await status("") == not_serving
                assert await status("clip.v1.ClipService") == not_serving
                assert await status("liveness") == serving
                await asyncio.sleep(0.1)
            assert not gw.health.serving
            assert gate.waiting == 1, "the warm-up is still held"
            gate.open()
            deadline = asyncio.get_running_loop().time() + 60
            while await status("") != serving:  # the health loop probes every second
                assert asyncio.get_running_loop().time() < deadline, "never SERVING"
                await asyncio.sleep(0.05)
            assert await status("clip.v1.ClipService") == serving
    # SERVING came after a real forward pass of each tower.
    assert {c.modality for c in gate.calls} == {"image", "text"}
