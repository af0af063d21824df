"""The HTTP API with the official `openai` client against a real gateway on loopback:
texts, images, both encodings, every error status, API keys, and the JSON twins."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import open_clip
import openai
import pytest
from PIL import Image

from service.api.clip.v1 import clip_pb2
from service.client import decode_embedding
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample, scrape
from service.server.app import Gateway
from service.wiring import build_gateway
from tests.support.gateway import stub_for
from tests.support.images import encode
from tests.support.models import ExportedModel
from tests.support.pki import CLIENT_AUTH, SERVER_NAMES, issue, make_ca
from tests.support.reference import reference_images, reference_texts

pytestmark = pytest.mark.integration

TOL = 1e-5
KEY = "http-test-key-0123456789"


def _client(gw: Gateway, key: str = "unused") -> openai.AsyncOpenAI:
    # No retries: every refusal must reach the test as the status the server sent.
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{gw.http_port}/v1", api_key=key, max_retries=0
    )


def _raw(
    gw: Gateway, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """A hand-made request (for what the openai client cannot send): status, JSON body."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{gw.http_port}{path}",
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST" if body is not None else "GET",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _chunked_post(port: int, padding: int) -> tuple[int, Any]:
    """`/v1/embeddings` sent in 1 KiB chunks with no Content-Length: status, JSON body."""
    body = json.dumps({"input": "a red circle", "user": "x" * padding}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST",
            "/v1/embeddings",
            body=(body[i : i + 1024] for i in range(0, len(body), 1024)),
            headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
            encode_chunked=True,
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _vectors(response: Any) -> np.ndarray:
    """The answer's vectors: the client decodes base64 itself only when it chose it (the
    default); asked for explicitly, base64 comes back as the string."""
    rows = [
        np.frombuffer(base64.b64decode(d.embedding), "<f4")
        if isinstance(d.embedding, str)
        else np.asarray(d.embedding, dtype=np.float32)
        for d in response.data
    ]
    return np.stack(rows)


async def test_texts_as_a_string_and_a_list_in_both_encodings_equal_open_clip_and_grpc(
    gateway: Gateway, demo_model: ExportedModel
) -> None:
    texts = ["a red circle", "", "ünïcödé 日本 🎉", "star " * 100]
    want = reference_texts(demo_model, texts)
    async with _client(gateway) as client:
        # The client's default encoding is base64 (it decodes the float32 bytes itself).
        default = await client.embeddings.create(model="clip", input=texts)
        floats = await client.embeddings.create(model="clip", input=texts, encoding_format="float")
        single = await client.embeddings.create(model="clip", input=texts[0])
        same_dim = await client.embeddings.create(
            model="clip", input=texts[:1], dimensions=64, encoding_format="float"
        )
    async with stub_for(gateway.port) as stub:
        grpc_answer = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts))
    from_grpc = np.stack([decode_embedding(e) for e in grpc_answer.embeddings])
    for response in (default, floats):
        assert response.model == "clip" and response.object == "list"
        assert [d.index for d in response.data] == [0, 1, 2, 3]
        assert all(d.object == "embedding" for d in response.data)
        assert np.abs(_vectors(response) - want).max() <= TOL
        # Both transports give the very same float32 vectors.
        np.testing.assert_array_equal(_vectors(response), from_grpc)
    assert len(single.data) == 1 and np.abs(_vectors(single)[0] - want[0]).max() <= TOL
    np.testing.assert_array_equal(_vectors(same_dim)[0], from_grpc[0])
    # Tokens read, as open_clip reads them: start and end tokens included, the long text
    # cut at the context (77); a row's tokens end with its last non-padding id.
    rows = open_clip.get_tokenizer(demo_model.name)(texts).numpy()
    per_text = [int(np.flatnonzero(row).max()) + 1 for row in rows]
    assert per_text[1] == 2 and per_text[3] == rows.shape[1] == 77  # "" and the cut text
    for response in (default, floats):
        assert response.usage.prompt_tokens == response.usage.total_tokens == sum(per_text)
    assert single.usage.prompt_tokens == per_text[0]


async def test_base64_answers_are_little_endian_float32(gateway: Gateway) -> None:
    body = json.dumps({"model": "clip", "input": ["a blue star"], "encoding_format": "base64"})
    status, answer = await asyncio.to_thread(_raw, gateway, "/v1/embeddings", body.encode())
    assert status == 200
    packed = base64.b64decode(answer["data"][0]["embedding"])
    assert len(packed) == 4 * 64
    status, floats = await asyncio.to_thread(
        _raw, gateway, "/v1/embeddings", json.dumps({"input": "a blue star"}).encode()
    )
    assert status == 200 and floats["model"] == "clip"  # no model: the default
    np.testing.assert_array_equal(
        np.frombuffer(packed, "<f4"), np.asarray(floats["data"][0]["embedding"], np.float32)
    )


async def test_images_as_base64_and_data_uris_mixed_with_texts_equal_open_clip(
    gateway: Gateway, demo_model: ExportedModel, photos: dict[str, Image.Image]
) -> None:
    blobs = [encode(photos["chelsea"], "JPEG", quality=90), encode(photos["coffee"], "PNG")]
    inputs: list[Any] = [
        {"image": base64.b64encode(blobs[0]).decode()},
        {"text": "a photo of a cat"},
        {"image": "data:image/png;base64," + base64.b64encode(blobs[1]).decode()},
    ]
    async with _client(gateway) as client:
        # The list goes through as it is: the client does not look inside `input`.
        for encoding in ("base64", "float"):
            response = await client.embeddings.create(
                model="clip", input=inputs, encoding_format=encoding
            )
            assert isinstance(response.data[0].embedding, str if encoding == "base64" else list)
            got = _vectors(response)
            assert got.shape == (3, 64)
            assert np.abs(got[[0, 2]] - reference_images(demo_model, blobs)).max() <= TOL
            assert (
                np.abs(got[1] - reference_texts(demo_model, ["a photo of a cat"])[0]).max() <= TOL
            )
            assert response.usage.prompt_tokens == 7  # only the text counts


async def test_bad_inputs_are_400_with_what_to_send_instead(gateway: Gateway) -> None:
    cases: list[tuple[Any, str]] = [
        ([{"image": "not base64 at all!"}], "input[0]: the image is not valid base64"),
        ([{"image": base64.b64encode(b"not an image").decode()}], "input[0]"),
        ([{"video": "x"}], "input[0]: object contains unknown field `video`; an input is"),
        ([], "input: is empty"),
        ([[1, 2, 3]], "token ids are not accepted"),
    ]
    async with _client(gateway) as client:
        for value, message in cases:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.embeddings.create(model="clip", input=value)
            assert caught.value.status_code == 400
            assert message in caught.value.body["message"], caught.value.body
            assert caught.value.body["type"] == "invalid_request_error"
            assert caught.value.body["code"] == "INVALID_ARGUMENT"
        # CLIP vectors cannot be shortened: another size than the model's is refused.
        with pytest.raises(openai.BadRequestError, match="cannot shorten"):
            await client.embeddings.create(model="clip", input="x", dimensions=32)
    # Broken JSON, a JSON array, a bad encoding: 400, and the server answers on after.
    for body, message in (
        (b'{"input": ["a", }', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"input": "a", "encoding_format": "int4"}', "encoding_format"),
        (b'{"input": "\xc3\x28"}', "not UTF-8 JSON"),
    ):
        status, answer = await asyncio.to_thread(_raw, gateway, "/v1/embeddings", body)
        assert status == 400 and message in answer["error"]["message"], answer
    status, answer = await asyncio.to_thread(_raw, gateway, "/health")
    assert status == 200 and answer == {"status": "alive"}


async def test_an_unknown_model_is_404_naming_the_served_ones(gateway: Gateway) -> None:
    async with _client(gateway) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.embeddings.create(model="gpt-embedding-9", input="x")
        models = await client.models.list()
    assert caught.value.status_code == 404
    assert "'gpt-embedding-9'" in caught.value.body["message"]
    assert "known models: clip" in caught.value.body["message"]
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [("clip", "model", "clipsvc")]
    assert isinstance(models.data[0].created, int)
    # Beyond OpenAI's fields: what GetModelInfo says of the model.
    described = models.data[0].model_dump()
    assert described["name"] == "clip" and described["default"] is True
    assert described["score_function"] == "softmax" and described["embedding_dim"] == 64


async def test_too_large_bodies_are_413_and_admission_overflow_is_429(
    demo_model: ExportedModel,
) -> None:
    settings = gateway_settings(demo_model.repository, max_message_bytes=4096, max_queued_items=2)
    async with running_gateway(settings) as gw, _client(gw) as client:
        with pytest.raises(openai.APIStatusError) as too_large:
            await client.embeddings.create(model="clip", input=["x" * 5000])
        assert too_large.value.status_code == 413
        assert "over the limit of 4096 bytes" in too_large.value.body["message"]
        # Without a Content-Length (chunked), the body is counted as it streams in.
        # 2 MiB still on its way when the 413 is sent: the connection drops it unread rather
        # than resetting, so the caller reads the 413 (it used to get ECONNRESET).
        for padding in (5 * 1024, 2 * 1024 * 1024):
            status, answer = await asyncio.to_thread(_chunked_post, gw.http_port, padding)
            assert status == 413 and "over the limit of 4096 bytes" in answer["error"]["message"]
        status, answer = await asyncio.to_thread(_chunked_post, gw.http_port, 0)
        assert status == 200 and len(answer["data"]) == 1
        # Three texts do not fit in a queue of two: refused at once, nothing queued.
        with pytest.raises(openai.RateLimitError) as busy:
            await client.embeddings.create(model="clip", input=["a", "b", "c"])
        assert busy.value.status_code == 429 and "server busy" in busy.value.body["message"]
        assert busy.value.body["code"] == "RESOURCE_EXHAUSTED"
        # The same limits over gRPC give the same row of the table.
        async with stub_for(gw.port) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as grpc_busy:
                await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=["a", "b", "c"]))
        assert grpc_busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = await client.embeddings.create(model="clip", input=["a", "b"])
        assert len(ok.data) == 2


async def test_a_backend_that_is_not_ready_is_503(demo_model: ExportedModel) -> None:
    # Triton on a port nobody listens on: the gateway runs, nothing can be embedded.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    settings = gateway_settings(
        demo_model.repository,
        backend="triton",
        triton_url=f"127.0.0.1:{dead}",
        backend_timeout_s=3.0,
    )
    gw = build_gateway(settings)
    await gw.start()
    try:
        status, answer = await asyncio.to_thread(_raw, gw, "/ready")
        assert status == 503 and answer == {"status": "not ready", "models": {"clip": False}}
        status, answer = await asyncio.to_thread(_raw, gw, "/health")
        assert status == 200  # alive: a Triton outage does not restart gateways
        async with _client(gw) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.embeddings.create(model="clip", input="x")
        assert caught.value.status_code == 503
        assert caught.value.body["code"] in ("UNAVAILABLE", "FAILED_PRECONDITION")
    finally:
        await gw.stop(1.0)


async def test_api_keys_over_http_and_grpc_alike(demo_model: ExportedModel) -> None:
    settings = gateway_settings(demo_model.repository, api_keys=(KEY,))
    async with running_gateway(settings) as gw:
        for key in ("wrong-key", KEY + "x"):
            async with _client(gw, key) as client:
                with pytest.raises(openai.AuthenticationError) as caught:
                    await client.embeddings.create(model="clip", input="x")
                assert caught.value.status_code == 401
                assert "Authorization: Bearer" in caught.value.body["message"]
                with pytest.raises(openai.AuthenticationError):
                    await client.models.list()
        # No header at all (the openai client always sends one).
        status, answer = await asyncio.to_thread(_raw, gw, "/v1/embeddings", b'{"input": "x"}')
        assert status == 401 and answer["error"]["type"] == "authentication_error"
        async with _client(gw, KEY) as client:
            answer = await client.embeddings.create(model="clip", input="x")
        assert len(answer.data) == 1
        # The same key opens gRPC.
        async with stub_for(gw.port) as stub:
            grpc_answer = await stub.EmbedText(
                clip_pb2.EmbedTextRequest(texts=["x"]),
                metadata=(("authorization", f"Bearer {KEY}"),),
            )
        np.testing.assert_array_equal(
            decode_embedding(grpc_answer.embeddings[0]), _vectors(answer)[0]
        )
        # Probes stay open without a key.
        status, _ = await asyncio.to_thread(_raw, gw, "/ready")
        assert status == 200
        samples = scrape(gw.metrics_port)
        refused = sample(
            samples, "clip_requests_total", method="http:embeddings", code="UNAUTHENTICATED"
        )
        assert refused == 3
        assert sample(samples, "clip_auth_failures_total") == 5


async def test_classify_and_similarity_are_the_grpc_answers_in_json(
    gateway: Gateway, photos: dict[str, Image.Image]
) -> None:
    images = [encode(photos["chelsea"], "JPEG"), encode(photos["coffee"], "PNG")]
    labels = ["a red circle", "a blue star", "a green hexagon"]
    b64 = [base64.b64encode(i).decode() for i in images]
    async with stub_for(gateway.port) as stub:
        grpc_classify = await stub.Classify(
            clip_pb2.ClassifyRequest(images=images, labels=labels, top_k=2)
        )
        grpc_similarity = await stub.Similarity(
            clip_pb2.SimilarityRequest(
                queries=[clip_pb2.Item(text="a cat"), clip_pb2.Item(image=images[0])],
                candidates=[clip_pb2.Item(image=images[1]), clip_pb2.Item(text="a mug")],
            )
        )
    body = {"images": b64, "labels": labels, "top_k": 2, "model": "clip"}
    status, classify = await asyncio.to_thread(
        _raw, gateway, "/v1/classify", json.dumps(body).encode()
    )
    # `model`: the name asked for, as /v1/embeddings answers (gRPC answers the model id).
    assert status == 200 and classify["model"] == "clip"
    for got, want in zip(classify["results"], grpc_classify.results, strict=True):
        assert [x["label"] for x in got["labels"]] == [x.label for x in want.labels]
        np.testing.assert_allclose(
            [x["probability"] for x in got["labels"]],
            [x.probability for x in want.labels],
            atol=1e-6,
        )
    body = {
        "queries": [{"text": "a cat"}, {"image": b64[0]}],
        "candidates": [{"image": b64[1]}, "a mug"],
    }
    status, similarity = await asyncio.to_thread(
        _raw, gateway, "/v1/similarity", json.dumps(body).encode()
    )
    assert status == 200 and similarity["model"] == "clip"  # none asked: the default's name
    np.testing.assert_allclose(
        [r["scores"] for r in similarity["rows"]],
        [list(r.scores) for r in grpc_similarity.rows],
        atol=1e-6,
    )


async def test_http_calls_are_counted_by_route_code_and_model(gateway: Gateway) -> None:
    def count(code: str, model: str) -> float:
        return sample(
            scrape(gateway.metrics_port),
            "clip_requests_total",
            method="http:embeddings",
            code=code,
            model=model,
        )

    before_ok, before_missing = count("OK", "clip"), count("NOT_FOUND", "")
    async with _client(gateway) as client:
        await client.embeddings.create(model="clip", input="counted")
        with pytest.raises(openai.NotFoundError):
            await client.embeddings.create(model="unknown-model-name", input="x")
    assert count("OK", "clip") == before_ok + 1
    # An unknown name is not a label value (callers cannot grow the series).
    assert count("NOT_FOUND", "") == before_missing + 1
    assert not any("unknown-model-name" in key for key in scrape(gateway.metrics_port))


def _https_post(port: int, context: ssl.SSLContext) -> int:
    request = urllib.request.Request(
        f"https://127.0.0.1:{port}/v1/embeddings",
        data=b'{"input": "a red circle"}',
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30, context=context) as response:
        return response.status


async def test_tls_files_make_the_http_port_https_with_client_certificates(
    demo_model: ExportedModel, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path, "ca")
    server, server_key = issue(tmp_path, ca, "server", SERVER_NAMES)
    client, client_key = issue(tmp_path, ca, "client", CLIENT_AUTH)
    trusting = ssl.create_default_context(cafile=str(ca))
    settings = gateway_settings(demo_model.repository, tls_cert=server, tls_key=server_key)
    async with running_gateway(settings) as gw:
        assert await asyncio.to_thread(_https_post, gw.http_port, trusting) == 200
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext: refused
            await asyncio.to_thread(_raw, gw, "/health")
    mutual = settings.replace(tls_client_ca=ca)
    async with running_gateway(mutual) as gw:
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            await asyncio.to_thread(_https_post, gw.http_port, trusting)  # no certificate
        with_certificate = ssl.create_default_context(cafile=str(ca))
        with_certificate.load_cert_chain(str(client), str(client_key))
        assert await asyncio.to_thread(_https_post, gw.http_port, with_certificate) == 200


async def test_image_urls_are_refused_unless_allowed(gateway: Gateway) -> None:
    # Off by default (no --image-url-allow): a URL is refused by index, nothing fetched.
    async with _client(gateway) as client:
        with pytest.raises(openai.BadRequestError, match="start it with --image-url-allow") as e:
            await client.embeddings.create(
                model="clip",
                input=["data:image/png;base64,AAAA", "https://example.com/cat.png"],
                extra_body={"modality": "image"},
            )
    assert "input[1]: image URLs are not fetched" in e.value.message
