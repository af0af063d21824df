"""The catalog against the real embedded engine: a gateway started with `--catalog FILE`
runs Milvus Lite's own `milvus` process on that file, and every call below goes over
gRPC or HTTP on loopback into it.

The items are the demo's rendered shapes (the trained demo model tells colours and
shapes apart), so "a blue star" has right answers: the blue stars.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import random
import shlex
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.api.clip.v1 import clip_pb2
from service.backends.milvus_store import MilvusStore
from service.backends.vector_store import IndexSettings
from service.client_pixels import PixelRecipe, make_pixels
from service.core.catalog import collection_name
from service.demo.images import write_demo_images
from service.demo.shapes import render
from service.errors import ModelMismatch
from service.model.metadata import load_repository
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample, scrape
from service.processes.milvus_lite import MilvusLite
from service.server.app import Gateway
from tests.support.gateway import stub_for
from tests.support.http_json import http_json
from tests.support.paths import REPO_ROOT
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

PAIRS = [(c, s) for c in ("red", "blue", "green") for s in ("star", "circle", "square")]
PER_PAIR = 3
CLI_DEADLINE_S = 180.0


def _png(colour: str, shape: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    render(colour, shape, random.Random(seed)).save(buffer, "PNG")
    return buffer.getvalue()


def _shape_items() -> list[clip_pb2.CatalogItem]:
    items = []
    for colour, shape in PAIRS:
        for k in range(PER_PAIR):
            items.append(
                clip_pb2.CatalogItem(
                    id=f"{colour}_{shape}_{k}",
                    image=_png(colour, shape, 100 * k + len(items)),
                    metadata_json=json.dumps({"colour": colour, "shape": shape, "k": k}),
                )
            )
    return items


async def _stream(items: list[clip_pb2.CatalogItem]) -> AsyncIterator[clip_pb2.CatalogItem]:
    for item in items:
        yield item


async def _add(
    gateway: Gateway, items: list[clip_pb2.CatalogItem]
) -> list[clip_pb2.CatalogAddResult]:
    async with stub_for(gateway.port) as stub:
        return [answer async for answer in stub.CatalogAdd(_stream(items))]


async def _search(gateway: Gateway, **fields: object) -> list[clip_pb2.SearchHit]:
    async with stub_for(gateway.port) as stub:
        return list((await stub.Search(clip_pb2.SearchRequest(**fields))).hits)


@dataclass
class Served:
    gateway: Gateway
    catalog: Path


@pytest.fixture(scope="module")
async def served(demo_model, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """A gateway with an embedded catalog holding the shapes."""
    catalog = tmp_path_factory.mktemp("catalog") / "catalog.db"
    settings = gateway_settings(demo_model.repository, catalog=str(catalog))
    async with running_gateway(settings) as gateway:
        answers = await _add(gateway, _shape_items())
        assert [a.id for a in answers if a.HasField("error")] == []
        yield Served(gateway, catalog)


async def test_a_text_query_finds_the_blue_stars(served: Served) -> None:
    hits = await _search(served.gateway, text="a blue star", top_k=PER_PAIR)
    assert sorted(h.id for h in hits) == [f"blue_star_{k}" for k in range(PER_PAIR)]
    assert all(json.loads(h.metadata_json)["colour"] == "blue" for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


async def test_an_image_query_and_a_vector_query_agree_with_exact_cosine(served: Served) -> None:
    query = _png("green", "circle", 999)
    async with stub_for(served.gateway.port) as stub:
        embedded = await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[query]))
    vector = list(embedded.embeddings[0].values)
    by_image = await _search(served.gateway, image=query, top_k=5)
    by_vector = await _search(
        served.gateway,
        vector=clip_pb2.QueryVector(values=vector, model_id=embedded.model),
        top_k=5,
    )
    assert [h.id for h in by_image] == [h.id for h in by_vector]
    assert by_image[0].id.startswith("green_circle_")
    # The scores are the cosines of the stored vectors (exact here: a few items, FLAT scan).
    async with stub_for(served.gateway.port) as stub:
        stored = await stub.EmbedImage(
            clip_pb2.EmbedImageRequest(images=[i.image for i in _shape_items()])
        )
    ids = [i.id for i in _shape_items()]
    cosines = np.array([e.values for e in stored.embeddings]) @ np.array(vector)
    for hit in by_image:
        assert hit.score == pytest.approx(cosines[ids.index(hit.id)], abs=1e-4)


async def test_re_adding_replaces_and_never_duplicates(served: Served) -> None:
    items = _shape_items()[:4]
    answers = await _add(served.gateway, items)
    assert all(not a.HasField("error") for a in answers)
    changed = clip_pb2.CatalogItem(
        id=items[0].id, text="a relabelled shape", metadata_json=json.dumps({"colour": "x"})
    )
    [answer] = await _add(served.gateway, [changed])
    assert not answer.HasField("error")
    hits = await _search(served.gateway, text="a shape", top_k=1000)
    ids = [h.id for h in hits]
    assert len(ids) == len(set(ids)) == len(PAIRS) * PER_PAIR
    # Searches hide repeated ids (the engine keeps the newest row per id): count the rows.
    assert served.gateway.catalog is not None
    assert await served.gateway.catalog.count("") == len(PAIRS) * PER_PAIR
    async with stub_for(served.gateway.port) as stub:
        got = await stub.CatalogGet(clip_pb2.CatalogGetRequest(ids=[items[0].id]))
    # The later add replaced the item: its metadata and what was embedded.
    assert json.loads(got.entries[0].metadata_json) == {"colour": "x"}
    assert got.entries[0].content_sha256 == answer.content_sha256 != answers[0].content_sha256
    await _add(served.gateway, _shape_items()[:1])  # restore


async def test_delete_removes_by_id_and_counts_what_was_there(served: Served) -> None:
    async with stub_for(served.gateway.port) as stub:
        gone = await stub.CatalogDelete(
            clip_pb2.CatalogDeleteRequest(ids=["blue_star_0", "no_such_item"])
        )
        assert gone.deleted == 1
        got = await stub.CatalogGet(clip_pb2.CatalogGetRequest(ids=["blue_star_0", "blue_star_1"]))
        assert [e.id for e in got.entries] == ["blue_star_1"]
        hits = await _search(served.gateway, text="a blue star", top_k=PER_PAIR)
        assert "blue_star_0" not in [h.id for h in hits]
        again = await stub.CatalogDelete(clip_pb2.CatalogDeleteRequest(ids=["blue_star_0"]))
        assert again.deleted == 0
    await _add(served.gateway, [i for i in _shape_items() if i.id == "blue_star_0"])


async def test_a_metadata_filter_keeps_only_matching_items(served: Served) -> None:
    hits = await _search(served.gateway, text="a star", top_k=50, filter_json='{"colour": "red"}')
    assert len(hits) == len(PAIRS) // 3 * PER_PAIR
    assert {json.loads(h.metadata_json)["colour"] for h in hits} == {"red"}
    hits = await _search(
        served.gateway,
        text="a star",
        top_k=50,
        filter_json=json.dumps({"shape": ["circle", "square"], "k": 0}),
    )
    assert sorted(h.id for h in hits) == sorted(
        f"{c}_{s}_0" for c, s in PAIRS if s in ("circle", "square")
    )


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"text": "x", "filter_json": '{"colour": "a\\"b"}'}, "without quotes"),
        ({"text": "x", "filter_json": '{"bad key": 1}'}, "filter key"),
        ({"text": "x", "filter_json": "[1]"}, "JSON object"),
        ({"text": "x", "top_k": 100_000}, "top_k"),
        ({}, "no query"),
        ({"pixels": b"\x00" * 5}, "pixels are 5 bytes"),
        ({"item_id": ""}, "item_id is 0 characters"),
        ({"item_id": "x" * 600}, "item_id is 600 characters"),
    ],
)
async def test_bad_searches_are_invalid_argument_and_say_why(
    served: Served, fields: dict[str, object], says: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _search(served.gateway, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in caught.value.details()


async def test_bad_items_answer_alone_and_the_stream_goes_on(served: Served) -> None:
    good = clip_pb2.CatalogItem(id="extra_text", text="a purple hexagon")
    items = [
        clip_pb2.CatalogItem(id="broken", image=b"not an image"),
        clip_pb2.CatalogItem(id="", text="no id"),
        clip_pb2.CatalogItem(id="bad_meta", text="x", metadata_json="[1, 2]"),
        clip_pb2.CatalogItem(id="nothing"),
        clip_pb2.CatalogItem(id="x" * 600, text="long id"),
        good,
    ]
    answers = {a.id: a for a in await _add(served.gateway, items)}
    assert len(answers) == len(items)
    for item_id in ("broken", "", "bad_meta", "nothing", "x" * 512):
        assert answers[item_id].error.code == "INVALID_ARGUMENT", item_id
    assert "metadata" in answers["bad_meta"].error.message
    assert not answers["extra_text"].HasField("error")
    async with stub_for(served.gateway.port) as stub:
        got = await stub.CatalogGet(
            clip_pb2.CatalogGetRequest(ids=["extra_text", "broken", "bad_meta"])
        )
        assert [e.id for e in got.entries] == ["extra_text"]
        await stub.CatalogDelete(clip_pb2.CatalogDeleteRequest(ids=["extra_text"]))


async def test_items_like_a_stored_one_are_its_nearest_others(served: Served) -> None:
    hits = await _search(served.gateway, item_id="blue_star_0", top_k=PER_PAIR - 1)
    # The same as a search by its stored vector, without the item itself.
    source = next(i for i in _shape_items() if i.id == "blue_star_0")
    async with stub_for(served.gateway.port) as stub:
        embedded = await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[source.image]))
    vector = clip_pb2.QueryVector(values=embedded.embeddings[0].values, model_id=embedded.model)
    by_vector = await _search(served.gateway, vector=vector, top_k=PER_PAIR)
    assert by_vector[0].id == "blue_star_0"
    assert [h.id for h in hits] == [h.id for h in by_vector[1:]]
    assert [h.score for h in hits] == pytest.approx([h.score for h in by_vector[1:]], abs=1e-5)
    assert sorted(h.id for h in hits) == [f"blue_star_{k}" for k in range(1, PER_PAIR)]
    # A filter applies as to any query; a missing item is NOT_FOUND, named.
    red = await _search(
        served.gateway, item_id="blue_star_0", top_k=5, filter_json='{"colour": "red"}'
    )
    assert len(red) == 5 and {json.loads(h.metadata_json)["colour"] for h in red} == {"red"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _search(served.gateway, item_id='no "such" item')
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert 'no "such" item' in caught.value.details()
    port = served.gateway.http_port
    status, body = await asyncio.to_thread(
        http_json, port, "/v1/search", {"item_id": "blue_star_0", "top_k": PER_PAIR - 1}
    )
    assert status == 200 and [h["id"] for h in body["hits"]] == [h.id for h in hits], body
    status, body = await asyncio.to_thread(http_json, port, "/v1/search", {"item_id": "gone"})
    assert status == 404 and "gone" in body["error"]["message"], body


async def test_a_vector_of_another_model_is_refused_and_named(served: Served) -> None:
    model_id = served.gateway.models.default_embedder.model_id
    vector = clip_pb2.QueryVector(values=[0.1] * 64, model_id="ViT-B-32/laion2b@0123")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _search(served.gateway, vector=vector)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ViT-B-32/laion2b@0123" in caught.value.details()
    assert model_id in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _search(served.gateway, vector=clip_pb2.QueryVector(values=[0.1] * 64))
    assert "must name the model" in caught.value.details()


async def _pixels_of(gateway: Gateway, image: bytes) -> bytes:
    """The image's pre-sized pixels, made as `clipsvc index` makes them (the model's
    recipe from GetModelInfo, the gateway's own preprocessing code)."""
    async with stub_for(gateway.port) as stub:
        info = await stub.GetModelInfo(clip_pb2.GetModelInfoRequest())
    recipe = PixelRecipe.from_model_info(info)
    assert recipe is not None
    pixels = make_pixels(image, recipe)
    assert pixels is not None
    return pixels


async def test_pixel_items_and_queries_equal_their_encoded_images(served: Served) -> None:
    image = _png("red", "square", 777)
    pixels = await _pixels_of(served.gateway, image)
    file_sha = hashlib.sha256(image).hexdigest()
    answers = await _add(
        served.gateway,
        [
            clip_pb2.CatalogItem(id="px_encoded", image=image),
            clip_pb2.CatalogItem(id="px_pixels", pixels=pixels, source_sha256=file_sha),
            clip_pb2.CatalogItem(id="px_unnamed", pixels=pixels),
        ],
    )
    stored = {a.id: (a.error.message, a.content_sha256) for a in answers}
    # The file's hash is kept for pixels made from it (a re-run can skip the file).
    assert stored == {
        "px_encoded": ("", file_sha),
        "px_pixels": ("", file_sha),
        "px_unnamed": ("", hashlib.sha256(pixels).hexdigest()),
    }
    try:
        by_image = await _search(served.gateway, image=image, top_k=5)
        by_pixels = await _search(served.gateway, pixels=pixels, top_k=5)
        assert [(h.id, h.score) for h in by_pixels] == [(h.id, h.score) for h in by_image]
        scores = {h.id: h.score for h in by_pixels}
        # The same vector stored three times: each is the query's own (cosine 1).
        for item_id in ("px_encoded", "px_pixels", "px_unnamed"):
            assert scores[item_id] == pytest.approx(1.0, abs=1e-6), scores
    finally:
        async with stub_for(served.gateway.port) as stub:
            ids = ["px_encoded", "px_pixels", "px_unnamed"]
            await stub.CatalogDelete(clip_pb2.CatalogDeleteRequest(ids=ids))


async def test_bad_pixel_items_answer_alone_and_say_why(served: Served) -> None:
    pixels = await _pixels_of(served.gateway, _png("blue", "circle", 778))
    answers = await _add(
        served.gateway,
        [
            clip_pb2.CatalogItem(id="px_short", pixels=pixels[:-1]),
            clip_pb2.CatalogItem(
                id="px_image_sha", image=_png("red", "star", 1), source_sha256="a" * 64
            ),
            clip_pb2.CatalogItem(id="px_bad_sha", pixels=pixels, source_sha256="not a hash"),
            clip_pb2.CatalogItem(id="px_upper_sha", pixels=pixels, source_sha256="A" * 64),
        ],
    )
    says = {a.id: (a.error.code, a.error.message) for a in answers}
    assert says["px_short"][0] == "INVALID_ARGUMENT"
    assert (
        f"{len(pixels) - 1} bytes" in says["px_short"][1]
        and str(len(pixels)) in says["px_short"][1]
    )
    for item_id in ("px_image_sha", "px_bad_sha", "px_upper_sha"):
        assert says[item_id][0] == "INVALID_ARGUMENT", says
        assert "source_sha256" in says[item_id][1], says
    async with stub_for(served.gateway.port) as stub:
        got = await stub.CatalogGet(clip_pb2.CatalogGetRequest(ids=list(says)))
    assert list(got.entries) == []


async def test_http_routes_add_search_get_delete(served: Served) -> None:
    port = served.gateway.http_port
    image = _png("blue", "square", 4242)
    status, body = await asyncio.to_thread(
        http_json,
        port,
        "/v1/catalog/items",
        {
            "items": [
                {
                    "id": "http_square",
                    "image": base64.b64encode(image).decode(),
                    "metadata": {"colour": "blue"},
                },
                {"id": "http_bad", "image": "!!"},
                # Never embedded as text: on the catalog as on /v1/embeddings.
                {"id": "http_uri", "text": "data:image/png;base64,iVBORw0KGgo="},
            ]
        },
    )
    assert status == 200, body
    assert "content_sha256" in body["results"][0]
    assert body["results"][1]["error"]["code"] == "INVALID_ARGUMENT"
    assert "data: URI" in body["results"][2]["error"]["message"], body
    status, body = await asyncio.to_thread(
        http_json, port, "/v1/search", {"text": "data:image/png;base64,iVBORw0KGgo="}
    )
    assert status == 400 and "data: URI" in body["error"]["message"], body
    status, body = await asyncio.to_thread(
        http_json,
        port,
        "/v1/search",
        {"text": "a blue square", "top_k": 4, "filter": {"colour": "blue"}},
    )
    assert status == 200, body
    assert "http_square" in [h["id"] for h in body["hits"]]
    assert all(h["metadata"]["colour"] == "blue" for h in body["hits"])
    status, body = await asyncio.to_thread(
        http_json, port, "/v1/search", {"vector": [0.0] * 64, "vector_model": "other"}
    )
    assert status == 400 and "other" in body["error"]["message"]
    status, body = await asyncio.to_thread(
        http_json, port, "/v1/catalog/get", {"ids": ["http_square"]}
    )
    assert body["items"][0]["metadata"] == {"colour": "blue"}
    status, body = await asyncio.to_thread(
        http_json, port, "/v1/catalog/delete", {"ids": ["http_square"]}
    )
    assert (status, body) == (200, {"deleted": 1})


async def test_http_routes_take_pixels_as_the_grpc_ones_do(served: Served) -> None:
    port = served.gateway.http_port
    image = _png("green", "star", 4343)
    pixels = await _pixels_of(served.gateway, image)
    file_sha = hashlib.sha256(image).hexdigest()
    encoded = base64.b64encode(pixels).decode()
    status, body = await asyncio.to_thread(
        http_json,
        port,
        "/v1/catalog/items",
        {
            "items": [
                {"id": "http_px", "pixels": encoded, "source_sha256": file_sha},
                {"id": "http_px_short", "pixels": base64.b64encode(pixels[:10]).decode()},
                {"id": "http_px_two", "pixels": encoded, "image": base64.b64encode(image).decode()},
            ]
        },
    )
    assert status == 200, body
    first, short, two = body["results"]
    assert first == {"id": "http_px", "content_sha256": file_sha}, body
    assert short["error"]["code"] == "INVALID_ARGUMENT" and "10 bytes" in short["error"]["message"]
    assert "exactly one of text, image and pixels" in two["error"]["message"], two
    try:
        status, by_pixels = await asyncio.to_thread(
            http_json, port, "/v1/search", {"pixels": encoded, "top_k": 3}
        )
        assert status == 200, by_pixels
        status, by_image = await asyncio.to_thread(
            http_json, port, "/v1/search", {"image": base64.b64encode(image).decode(), "top_k": 3}
        )
        assert by_pixels == by_image
        assert by_pixels["hits"][0]["id"] == "http_px"
        assert by_pixels["hits"][0]["score"] == pytest.approx(1.0, abs=1e-6)
        status, body = await asyncio.to_thread(
            http_json, port, "/v1/search", {"pixels": base64.b64encode(b"abc").decode()}
        )
        assert status == 400 and "pixels are 3 bytes" in body["error"]["message"], body
    finally:
        await asyncio.to_thread(http_json, port, "/v1/catalog/delete", {"ids": ["http_px"]})


async def test_a_restarted_gateway_keeps_the_catalog(demo_model, tmp_path: Path) -> None:
    settings = gateway_settings(demo_model.repository, catalog=str(tmp_path / "kept.db"))
    async with running_gateway(settings) as gateway:
        await _add(gateway, [i for i in _shape_items() if i.id.startswith("red_")])
    async with running_gateway(settings) as gateway:
        hits = await _search(gateway, text="a red circle", top_k=PER_PAIR)
    assert sorted(h.id for h in hits) == [f"red_circle_{k}" for k in range(PER_PAIR)]


def _engine_pids(db: Path) -> list[int]:
    """Live (not zombie) milvus engine processes serving `db`, from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and argv[0].endswith(b"/milvus") and str(db).encode() in argv:
            pids.append(int(entry.name))
    return pids


async def test_a_crashed_engine_is_restarted_and_its_items_come_back(
    demo_model, tmp_path: Path
) -> None:
    db = tmp_path / "crash.db"
    settings = gateway_settings(demo_model.repository, catalog=str(db))
    async with running_gateway(settings) as gateway:
        await _add(gateway, [i for i in _shape_items() if i.id.startswith("red_")])
        [pid] = _engine_pids(db)
        os.killpg(pid, signal.SIGKILL)
        await eventually(lambda: _engine_pids(db), lambda pids: pid not in pids, what="dead")
        # Down: UNAVAILABLE, which a caller may retry (before: INTERNAL, for ever).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _search(gateway, text="a red circle", top_k=PER_PAIR)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert "retry" in caught.value.details()

        async def search() -> list[str] | grpc.StatusCode:
            try:
                return sorted(h.id for h in await _search(gateway, text="a red circle", top_k=3))
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        # Restarted on the same file: the items added before the crash are found again,
        # and every answer on the way was UNAVAILABLE or the items.
        answers = []
        want = [f"red_circle_{k}" for k in range(PER_PAIR)]
        await eventually(search, lambda got: answers.append(got) or got == want, what="found again")
        assert set(map(str, answers)) <= {str(want), str(grpc.StatusCode.UNAVAILABLE)}, answers
        [again] = _engine_pids(db)
        assert again != pid
        assert sample(scrape(gateway.metrics_port), "clip_catalog_engine_restarts_total") == 1
        # Adding works again too.
        [added] = await _add(gateway, [clip_pb2.CatalogItem(id="after", text="a red star")])
        assert not added.HasField("error"), added.error
    # Stopped on purpose: not restarted, nothing left running on the file.
    assert _engine_pids(db) == []


async def test_a_hung_engine_is_deadline_exceeded_and_answers_again_when_it_resumes(
    demo_model, tmp_path: Path
) -> None:
    db = tmp_path / "hung.db"
    settings = gateway_settings(demo_model.repository, catalog=str(db), backend_timeout_s=3.0)
    async with running_gateway(settings) as gateway:
        await _add(gateway, [i for i in _shape_items() if i.id.startswith("green_")])
        [pid] = _engine_pids(db)
        os.killpg(pid, signal.SIGSTOP)
        try:
            # Before: pymilvus's own DEADLINE_EXCEEDED passed through as an unknown error,
            # INTERNAL "internal error (_InactiveRpcError)".
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _search(gateway, text="a green star", top_k=PER_PAIR)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
            assert "--backend-timeout-s" in caught.value.details()
        finally:
            os.killpg(pid, signal.SIGCONT)
        hits = await _search(gateway, text="a green star", top_k=PER_PAIR)
        assert sorted(h.id for h in hits) == [f"green_star_{k}" for k in range(PER_PAIR)]
        assert _engine_pids(db) == [pid]  # the same engine: a pause is no crash


async def test_a_catalog_made_for_another_model_is_refused_at_start(
    demo_model, tmp_path: Path
) -> None:
    path = tmp_path / "other.db"
    metadata = load_repository(demo_model.repository)["clip"]
    with MilvusLite(path) as engine:
        store = MilvusStore(engine.uri, index=IndexSettings(), timeout_s=30)
        name = collection_name(metadata.model_id, metadata.model_name)
        store.open_collection(name, dim=64, model_id="some-other-model@ffff")
        store.close()
    settings = gateway_settings(demo_model.repository, catalog=str(path))
    from service.wiring import build_gateway

    gateway = build_gateway(settings)
    try:
        with pytest.raises(ModelMismatch, match="some-other-model@ffff"):
            await gateway.start()
    finally:
        await gateway.stop(0)


async def test_a_gateway_without_catalog_says_how_to_get_one(demo_model) -> None:
    async with running_gateway(gateway_settings(demo_model.repository)) as gateway:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _search(gateway, text="x")
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "--catalog" in caught.value.details()
        status, body = await asyncio.to_thread(
            http_json, gateway.http_port, "/v1/search", {"text": "x"}
        )
        assert status == 501 and "--catalog" in body["error"]["message"]


# ---------------------------------------------------------------------- the CLI
def _readme_catalog_lines() -> list[list[str]]:
    readme = (REPO_ROOT / "README.md").read_text()
    start = readme.index("\n### Search a folder of images\n")
    end = readme.index("\n#", start + 5)
    lines = []
    for line in readme[start:end].splitlines():
        if line.startswith(".venv/bin/clipsvc "):
            for part in line.split("&&"):
                lines.append(shlex.split(part.strip(), comments=True)[1:])
    return lines


async def _clipsvc(port: int, cwd: Path, args: list[str]) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_")}
    env["CLIP_TARGET"] = f"127.0.0.1:{port}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", *args, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), CLI_DEADLINE_S)
    return process.returncode or 0, out.decode()


async def test_readme_index_then_search_finds_blue_stars_and_a_rerun_adds_only_changes(
    demo_model, tmp_path: Path
) -> None:
    lines = _readme_catalog_lines()
    assert [args[0] for args in lines] == ["index", "search"]
    assert lines[0][1] == "demo-images/"
    write_demo_images(tmp_path / "demo-images", per_pair=2)
    settings = gateway_settings(demo_model.repository, catalog=str(tmp_path / "catalog.db"))
    async with running_gateway(settings) as gateway:
        code, out = await _clipsvc(gateway.port, tmp_path, lines[0])
        assert code == 0, out
        assert "96 added or updated, 0 unchanged, 0 failed" in out
        code, out = await _clipsvc(gateway.port, tmp_path, lines[1])
        assert code == 0, out
        rows = [line.split(maxsplit=1) for line in out.splitlines() if line.strip()]
        # The two blue stars first, as absolute paths of the files.
        assert {Path(p).name for _, p in rows[:2]} == {"blue_star_0.png", "blue_star_1.png"}
        assert await asyncio.to_thread(lambda: all(Path(p).is_file() for _, p in rows))
        # A re-run sends only new or changed files.
        (tmp_path / "demo-images" / "red" / "red_star_0.png").write_bytes(_png("blue", "star", 5))
        render("blue", "star", random.Random(6)).save(tmp_path / "demo-images" / "new_star.png")
        code, out = await _clipsvc(gateway.port, tmp_path, lines[0])
        assert code == 0, out
        assert "2 added or updated, 95 unchanged, 0 failed" in out


async def test_index_sends_pixels_from_local_workers_and_a_no_pixels_rerun_skips_them(
    demo_model, tmp_path: Path
) -> None:
    folder = tmp_path / "shapes"
    folder.mkdir()
    for colour, shape in PAIRS:
        (folder / f"{colour}_{shape}.png").write_bytes(_png(colour, shape, 31))
    settings = gateway_settings(demo_model.repository, catalog=str(tmp_path / "catalog.db"))
    async with running_gateway(settings) as gateway:
        code, out = await _clipsvc(gateway.port, tmp_path, ["index", "shapes", "--workers", "2"])
        assert code == 0, out
        assert "sending pixels made by 2 local workers" in out, out
        assert f"{len(PAIRS)} added or updated, 0 unchanged, 0 failed" in out, out
        ids = sorted(p.name for p in folder.iterdir())
        async with stub_for(gateway.port) as stub:
            got = await stub.CatalogGet(clip_pb2.CatalogGetRequest(ids=ids))
        # Stored under the file's hash: the pixels were made from these very bytes.
        want = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ids}
        assert {e.id: e.content_sha256 for e in got.entries} == want
        # The same vector as the gateway's own decode: each file finds itself at cosine 1.
        for name in ids[:3]:
            [hit] = await _search(gateway, image=(folder / name).read_bytes(), top_k=1)
            assert hit.id == name and hit.score == pytest.approx(1.0, abs=1e-6)
        code, out = await _clipsvc(gateway.port, tmp_path, ["index", "shapes", "--no-pixels"])
        assert code == 0, out
        assert f"0 added or updated, {len(PAIRS)} unchanged, 0 failed" in out, out
        # More like one of them: the others, best first, by their paths; never itself.
        like = ["search", "--like", "red_circle.png", "-k", "3"]
        code, out = await _clipsvc(gateway.port, tmp_path, like)
        assert code == 0, out
        rows = [line.split(maxsplit=1) for line in out.splitlines() if line.strip()]
        names = [Path(path).name for _, path in rows]
        assert len(names) == 3 and "red_circle.png" not in names, out
        assert [float(score) for score, _ in rows] == sorted(
            (float(score) for score, _ in rows), reverse=True
        )
        for wrong in (["search"], ["search", "a star", "--like", "red_circle.png"]):
            code, out = await _clipsvc(gateway.port, tmp_path, wrong)
            assert code == 2 and "exactly one" in out, out
