"""Two models exported into one repository (`clipsvc export --name`), served at once by
one gateway: each answers with its own vectors, by name, over gRPC and HTTP."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service.api.clip.v1 import clip_pb2
from service.client import AsyncClipClient, decode_embedding
from service.model.export import export_model, load_open_clip
from service.model.metadata import repository_names
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample, scrape
from service.server.app import Gateway
from service.wiring import build_gateway
from tests.support.gateway import stub_for
from tests.support.images import encode
from tests.support.models import ExportedModel
from tests.support.paths import DEMO_WEIGHTS
from tests.support.reference import reference_images, reference_texts
from tests.support.triton import start_triton

pytestmark = pytest.mark.integration

TOL = 1e-5
ARCH = "clip-demo-shapes"
OTHER = "shapes-random"


def _tree_digest(root: Path, names: list[str]) -> dict[str, str]:
    """sha256 of every file under `root/<name>` (files or folders), by relative path."""
    out: dict[str, str] = {}
    for name in names:
        top = root / name
        for path in sorted([top, *top.rglob("*")] if top.is_dir() else [top]):
            if path.is_file():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportedModel]:
    """The trained demo as `clip` and a random-weight one as `shapes-random`, one repository."""
    root = tmp_path_factory.mktemp("multi")
    repository = root / "repo"
    export_model(ARCH, str(DEMO_WEIGHTS), repository, progress=False)
    demo, _ = load_open_clip(ARCH, str(DEMO_WEIGHTS))
    clip_files = ["clip_image", "clip_text", "metadata.json"]
    before = _tree_digest(repository, clip_files)
    torch.manual_seed(4321)
    random_clip, _ = load_open_clip(ARCH, "none")
    checkpoint = root / "random.pt"
    torch.save(random_clip.state_dict(), checkpoint)
    summary = export_model(ARCH, str(checkpoint), repository, progress=False, name=OTHER)
    # The second export wrote its own files only, and left the first model's as they were.
    assert _tree_digest(repository, clip_files) == before
    assert set(summary.files) == set(
        _tree_digest(repository, [f"{OTHER}_image", f"{OTHER}_text", f"metadata.{OTHER}.json"])
    )
    assert repository_names(repository) == ["clip", OTHER]
    random_loaded, _ = load_open_clip(ARCH, str(checkpoint))
    return {
        "clip": ExportedModel(ARCH, demo, repository),
        OTHER: ExportedModel(ARCH, random_loaded, repository),
    }


@pytest.fixture(scope="module")
async def gateway(two_models: dict[str, ExportedModel]) -> AsyncIterator[Gateway]:
    async with running_gateway(gateway_settings(two_models["clip"].repository)) as gw:
        yield gw


async def test_each_model_answers_with_its_own_vectors_over_grpc_and_http(
    gateway: Gateway, two_models: dict[str, ExportedModel], photos: dict[str, Image.Image]
) -> None:
    texts = ["a red circle", "a photo of a blue star"]
    blobs = [encode(photos["chelsea"], "JPEG"), encode(photos["coffee"], "PNG")]
    got: dict[str, np.ndarray] = {}
    async with stub_for(gateway.port) as stub:
        for name, model in two_models.items():
            text_answer = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts, model=name))
            image_answer = await stub.EmbedImage(
                clip_pb2.EmbedImageRequest(images=blobs, model=name)
            )
            text_vecs = np.stack([decode_embedding(e) for e in text_answer.embeddings])
            image_vecs = np.stack([decode_embedding(e) for e in image_answer.embeddings])
            assert np.abs(text_vecs - reference_texts(model, texts)).max() <= TOL
            assert np.abs(image_vecs - reference_images(model, blobs)).max() <= TOL
            got[name] = text_vecs
            info = await stub.GetModelInfo(clip_pb2.GetModelInfoRequest(model=name))
            assert text_answer.model == image_answer.model == info.model_id
            assert info.name == name
        # No model named: the default, `clip`.
        default = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts))
        np.testing.assert_array_equal(
            np.stack([decode_embedding(e) for e in default.embeddings]), got["clip"]
        )
    # Two different models: their vectors differ (the test could tell them apart).
    assert np.abs(got["clip"] - got[OTHER]).max() > 0.1
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{gateway.http_port}/v1", api_key="x", max_retries=0
    ) as client:
        for name, model in two_models.items():
            answer = await client.embeddings.create(model=name, input=texts)
            vectors = np.asarray([d.embedding for d in answer.data], dtype=np.float32)
            assert answer.model == name
            assert np.abs(vectors - reference_texts(model, texts)).max() <= TOL
        listed = await client.models.list()
    assert [m.id for m in listed.data] == ["clip", OTHER]


async def test_one_cache_one_decode_pool_and_one_pixel_budget_for_every_model(
    two_models: dict[str, ExportedModel],
) -> None:
    """Issue 24, cases 6 and 7: the decode pool and its pixel budget, and the cache (an
    empty one is falsy: `cache or build_cache(...)` built one per model, each with its own
    LRU bounds, Redis pool and breaker) existed once per model. The README promises one
    of each per gateway: --decode-budget-pixels and --local-cache-items bound the whole."""
    settings = gateway_settings(
        two_models["clip"].repository,
        local_cache_items=4,
        decode_threads=2,
        decode_budget_pixels=4_000_000,
    )
    async with running_gateway(settings) as gw, stub_for(gw.port) as stub:
        first, second = (m.embedder for m in gw.models)
        assert first._pixel_budget is second._pixel_budget
        assert first._pixel_budget is not None and first._pixel_budget.limit == 4_000_000
        assert first._decoding is second._decoding  # its threads, both lanes
        assert first._cache is second._cache and first._label_cache is second._label_cache
        # Three new texts per model: the one LRU keeps 4 entries in all (not 4 per model).
        for name in two_models:
            texts = [f"{name} text {i}" for i in range(3)]
            await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts, model=name))
        assert len(first._cache) == 4


async def test_list_models_names_both_and_the_client_reaches_either(gateway: Gateway) -> None:
    async with stub_for(gateway.port) as stub:
        listed = await stub.ListModels(clip_pb2.ListModelsRequest())
    assert [m.name for m in listed.models] == ["clip", OTHER]
    assert listed.models[0].model_id != listed.models[1].model_id
    assert all(m.embedding_dim == 64 and m.backend == "embedded" for m in listed.models)
    async with AsyncClipClient(f"127.0.0.1:{gateway.port}") as client:
        infos = await client.list_models()
        other = await client.embed_text(["a green hexagon"], model=OTHER)
        default = await client.embed_text(["a green hexagon"])
    assert [i.name for i in infos] == ["clip", OTHER]
    assert other.model == infos[1].model_id and default.model == infos[0].model_id


async def test_an_unknown_model_is_not_found_naming_the_known_ones(gateway: Gateway) -> None:
    calls = {
        "EmbedText": lambda s: s.EmbedText(clip_pb2.EmbedTextRequest(texts=["x"], model="nope")),
        "Similarity": lambda s: s.Similarity(
            clip_pb2.SimilarityRequest(
                queries=[clip_pb2.Item(text="a")],
                candidates=[clip_pb2.Item(text="b")],
                model="nope",
            )
        ),
        "Classify": lambda s: s.Classify(
            clip_pb2.ClassifyRequest(images=[b"x"], labels=["a"], model="nope")
        ),
        "GetModelInfo": lambda s: s.GetModelInfo(clip_pb2.GetModelInfoRequest(model="nope")),
    }
    async with stub_for(gateway.port) as stub:
        for what, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(stub)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND, what
            assert caught.value.details() == (
                f"model 'nope' is not served here; known models: clip, {OTHER}"
            )
        # A stream item naming an unknown model fails alone; the stream goes on.
        answers = [
            a
            async for a in stub.EmbedStream(
                iter(
                    [
                        clip_pb2.StreamRequest(id="bad", text="x", model="nope"),
                        clip_pb2.StreamRequest(id="good", text="x", model=OTHER),
                    ]
                )
            )
        ]
    by_id = {a.id: a for a in answers}
    assert by_id["bad"].error.code == "NOT_FOUND" and "known models" in by_id["bad"].error.message
    assert by_id["good"].WhichOneof("result") == "embedding"


async def test_similarity_and_classify_stay_within_the_named_model(
    gateway: Gateway, two_models: dict[str, ExportedModel], photos: dict[str, Image.Image]
) -> None:
    image = encode(photos["chelsea"], "PNG")
    texts = ["a red circle", "a blue star"]
    async with stub_for(gateway.port) as stub:
        for name, model in two_models.items():
            answer = await stub.Similarity(
                clip_pb2.SimilarityRequest(
                    queries=[clip_pb2.Item(image=image)],
                    candidates=[clip_pb2.Item(text=t) for t in texts],
                    model=name,
                )
            )
            want = reference_images(model, [image]) @ reference_texts(model, texts).T
            np.testing.assert_allclose(list(answer.rows[0].scores), want[0], atol=1e-5)
            classified = await stub.Classify(
                clip_pb2.ClassifyRequest(images=[image], labels=texts, templates=["{}"], model=name)
            )
            best = texts[int(np.argmax(want[0]))]
            assert classified.results[0].labels[0].label == best
            assert classified.model == answer.model


async def test_health_per_model_and_metrics_by_model(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "clip.v1.ClipService/clip", f"clip.v1.ClipService/{OTHER}"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="clip.v1.ClipService/nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    def counts() -> tuple[float, float]:
        samples = scrape(gateway.metrics_port)
        return (
            sample(samples, "clip_requests_total", method="EmbedText", code="OK", model=OTHER),
            sample(samples, "clip_items_embedded_total", modality="text", model=OTHER),
        )

    before = counts()
    async with stub_for(gateway.port) as stub:
        await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=["one", "two"], model=OTHER))
    assert counts() == (before[0] + 1, before[1] + 2)


async def test_a_repository_exported_before_names_still_serves(
    demo_model: ExportedModel, tmp_path: Path
) -> None:
    """metadata.json without `name` (as exports wrote it before): the model `clip`."""
    legacy = tmp_path / "legacy"
    shutil.copytree(demo_model.repository, legacy)
    raw = json.loads((legacy / "metadata.json").read_text())
    del raw["name"]
    assert raw["image_model"] == "clip_image" and raw["text_model"] == "clip_text"
    (legacy / "metadata.json").write_text(json.dumps(raw))
    async with running_gateway(gateway_settings(legacy)) as gw, stub_for(gw.port) as stub:
        listed = await stub.ListModels(clip_pb2.ListModelsRequest())
        answer = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=["a red circle"]))
        named = await stub.EmbedText(
            clip_pb2.EmbedTextRequest(texts=["a red circle"], model="clip")
        )
    assert [m.name for m in listed.models] == ["clip"]
    want = reference_texts(demo_model, ["a red circle"])
    assert np.abs(decode_embedding(answer.embeddings[0]) - want[0]).max() <= TOL
    # Naming `clip` reaches the same model: the very same vector, from the LRU the first
    # call filled (it is filled before that answer is sent, so this is no race).
    np.testing.assert_array_equal(
        decode_embedding(named.embeddings[0]), decode_embedding(answer.embeddings[0])
    )
    assert not answer.embeddings[0].cached and named.embeddings[0].cached


def test_the_default_model_must_be_served_or_unambiguous(
    two_models: dict[str, ExportedModel], tmp_path: Path
) -> None:
    repository = two_models["clip"].repository
    with pytest.raises(ValueError, match="--default-model 'nope' is not in the repository"):
        build_gateway(gateway_settings(repository, default_model="nope"))
    # Only named models and none called `clip`: a default must be chosen.
    only_named = tmp_path / "named"
    only_named.mkdir()
    for name in ("shapes-random_image", "shapes-random_text", "metadata.shapes-random.json"):
        source = repository / name
        if source.is_dir():
            shutil.copytree(source, only_named / name)
        else:
            shutil.copy(source, only_named / name)
    shutil.copy(only_named / "metadata.shapes-random.json", only_named / "metadata.b.json")
    with pytest.raises(ValueError, match="choose one with --default-model"):
        build_gateway(gateway_settings(only_named))


async def test_triton_serves_both_models_of_one_repository(
    two_models: dict[str, ExportedModel], tmp_path: Path, photos: dict[str, Image.Image]
) -> None:
    """One Triton on the shared repository (four Triton models), one gateway in front:
    each name reaches its own pair, identity-checked against its own metadata."""
    repository = two_models["clip"].repository
    texts = ["a red circle", "a photo of a blue star"]
    blobs = [encode(photos["astronaut"], "JPEG")]
    with start_triton(repository, workdir=tmp_path / "triton") as triton:
        settings = gateway_settings(repository, backend="triton", triton_url=triton.grpc_url)
        async with running_gateway(settings) as gw, stub_for(gw.port) as stub:
            listed = await stub.ListModels(clip_pb2.ListModelsRequest())
            assert [(m.name, m.backend) for m in listed.models] == [
                ("clip", "triton"),
                (OTHER, "triton"),
            ]
            for name, model in two_models.items():
                text_answer = await stub.EmbedText(
                    clip_pb2.EmbedTextRequest(texts=texts, model=name)
                )
                image_answer = await stub.EmbedImage(
                    clip_pb2.EmbedImageRequest(images=blobs, model=name)
                )
                got = np.stack([decode_embedding(e) for e in text_answer.embeddings])
                assert np.abs(got - reference_texts(model, texts)).max() <= TOL
                image = decode_embedding(image_answer.embeddings[0])
                assert np.abs(image - reference_images(model, blobs)[0]).max() <= TOL
