"""The HTTP door as hard to break as the gRPC door (issue 24): each numbered case of the
issue against a real gateway over loopback HTTP (cases 6 and 7, several models, are in
test_multi_model.py). Each test failed on the code before the fix."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest

from service.api.clip.v1 import clip_pb2
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample, scrape
from service.server.app import Gateway
from tests.support.gateway import stub_for
from tests.support.http_json import http_raw, image_input
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.polling import metric_reads

pytestmark = pytest.mark.integration

#: The soak's target, and the chart's probes time out at 3 s.
HEALTH_BOUND_S = 1.0


@pytest.fixture(scope="module")
async def gateway(demo_model: ExportedModel) -> AsyncIterator[Gateway]:
    settings = gateway_settings(demo_model.repository, max_message_bytes=16 * 1024 * 1024)
    async with running_gateway(settings) as gw:
        yield gw


class HealthProbes(list[float]):
    """Latencies of `GET /health` (inf for one that failed), and why each failed one did."""

    failures: list[str]

    def worst(self) -> str:
        return f"worst health check {max(self):.2f} s; failures: {self.failures}"


@contextlib.asynccontextmanager
async def health_latencies(port: int) -> AsyncIterator[HealthProbes]:
    """`GET /health` again and again from a thread of its own while the block runs; the
    latency of each (inf for one that failed or took past 10 s). The thread is awaited,
    not joined: the gateway under test runs on this event loop, and a join here would
    hold the probe in flight unanswered."""
    seen = HealthProbes()
    seen.failures = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            try:
                status, _, answer = http_raw(port, "/health", timeout_s=10)
                failure = None if status == 200 else f"{status} {answer}"
            except OSError as exc:
                failure = repr(exc)
            took = time.perf_counter() - began
            seen.append(took if failure is None else float("inf"))
            if failure is not None:
                seen.failures.append(f"after {took:.2f} s: {failure}")
            stop.wait(0.05)

    thread = threading.Thread(target=poll, name="health-poll", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)


def _post(port: int, path: str, body: Any) -> tuple[int, dict[str, str], Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http_raw(port, path, data)


def _items_embedded(gw: Gateway) -> float:
    samples = scrape(gw.metrics_port)
    return sum(sample(samples, "clip_items_embedded_total", modality=m) for m in ("text", "image"))


# ---------------------------------------------------------------------------- case 1
async def test_usage_of_cached_long_texts_leaves_health_answering(gateway: Gateway) -> None:
    """Texts of 10,000 letters, already cached (embedded over gRPC): `usage` used to be
    counted by tokenizing every text again on the event loop (256 of them: health silent
    for 22 s). Now the cache keeps each text's count from the embedding's tokenization."""
    rng = np.random.default_rng(24)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    texts = ["".join(rng.choice(letters, 10_000)) for _ in range(128)]
    async with stub_for(gateway.port) as stub:
        for start in range(0, len(texts), 16):  # each call well inside --backend-timeout-s
            chunk = texts[start : start + 16]
            await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=chunk), timeout=600)
    async with health_latencies(gateway.http_port) as seen:
        status, _, answer = await asyncio.to_thread(
            _post, gateway.http_port, "/v1/embeddings", {"input": texts}
        )
    assert status == 200, answer
    # Each text is cut at the 77-token context: start and end tokens included.
    assert answer["usage"] == {"prompt_tokens": 128 * 77, "total_tokens": 128 * 77}
    assert seen and max(seen) < HEALTH_BOUND_S, seen.worst()


async def test_usage_not_in_the_cache_is_counted_off_the_event_loop(
    demo_model: ExportedModel,
) -> None:
    """With the local cache off nothing keeps a count: texts are counted again, on the
    decode threads, exactly as the embedding counts them."""
    settings = gateway_settings(demo_model.repository, local_cache_items=0)
    async with running_gateway(settings) as gw:
        for _ in range(2):
            status, _, answer = await asyncio.to_thread(
                _post, gw.http_port, "/v1/embeddings", {"input": ["a red circle", "x" * 5000]}
            )
            assert status == 200, answer
            assert answer["usage"]["prompt_tokens"] == 5 + 77


# ---------------------------------------------------------------------------- case 2
async def test_millions_of_empty_objects_are_a_400_naming_the_limit(gateway: Gateway) -> None:
    """A body just under --max-message-bytes of `{"input":[{},{},...]}` was parsed whole on
    the event loop (1.7 GB, health silent for 14 s): now refused after a few thousand
    tokens, with a 400 naming the bound, and health answers throughout."""
    limit = gateway.options.max_message_bytes
    body = b'{"input":[' + b",".join([b"{}"] * ((limit - 16) // 3)) + b"]}"
    assert limit - 16 < len(body) <= limit
    async with health_latencies(gateway.http_port) as seen:
        status, _, answer = await asyncio.to_thread(
            _post, gateway.http_port, "/v1/embeddings", body
        )
    assert status == 400, answer
    message = answer["error"]["message"]
    assert "JSON strings, arrays, objects and list elements" in message
    assert "--max-items" in message
    assert seen and max(seen) < HEALTH_BOUND_S, seen.worst()


@pytest.mark.parametrize("where", ["input", "user"])
async def test_deep_nesting_is_a_400_not_a_recursion_error(gateway: Gateway, where: str) -> None:
    nested = b"[" * 200_000 + b"]" * 200_000
    body = (
        b'{"input": ' + nested + b"}"
        if where == "input"
        else b'{"input": "x", "user": ' + nested + b"}"
    )
    status, _, answer = await asyncio.to_thread(_post, gateway.http_port, "/v1/embeddings", body)
    assert status == 400, answer
    assert "deeper than 16 levels" in answer["error"]["message"]


# ---------------------------------------------------------------------------- case 3
@pytest.fixture(scope="module")
async def small_gateway(demo_model: ExportedModel) -> AsyncIterator[Gateway]:
    settings = gateway_settings(
        demo_model.repository,
        max_message_bytes=256 * 1024,
        max_concurrent_rpcs=4,
        max_http_body_reads=6,
        http_body_timeout_s=3.0,
        http_header_timeout_s=3.0,
    )
    async with running_gateway(settings) as gw:
        yield gw


async def test_an_answer_past_the_send_limit_is_refused_before_any_work_on_both_doors(
    small_gateway: Gateway,
) -> None:
    """/v1/classify answers had no bound (95.7 MB from a 329 KB request); each door now
    weighs the answer on its own wire, before any work: 413 over HTTP, RESOURCE_EXHAUSTED
    over gRPC, nothing embedded."""
    gw = small_gateway
    images = [encode(photo_like(16, 16, seed=i), "PNG") for i in range(10)]
    labels = [f"label {i} " + "x" * 290 for i in range(100)]
    before = _items_embedded(gw)
    body = {"images": [image_input(b)["image"] for b in images], "labels": labels}
    body["templates"] = ["{}"]
    status, _, answer = await asyncio.to_thread(_post, gw.http_port, "/v1/classify", body)
    assert status == 413, answer
    assert "the answer would be about" in answer["error"]["message"]
    assert answer["error"]["code"] == "RESOURCE_EXHAUSTED"
    async with stub_for(gw.port) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Classify(
                clip_pb2.ClassifyRequest(images=images, labels=labels, templates=["{}"]),
                timeout=60,
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # 200 vectors: ~57 KB packed in protobuf, ~320 KB as JSON floats, ~80 KB as base64.
        texts = [f"text {i}" for i in range(200)]
        grpc_answer = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts), timeout=60)
    assert len(grpc_answer.embeddings) == 200
    status, _, answer = await asyncio.to_thread(
        _post, gw.http_port, "/v1/embeddings", {"input": texts, "encoding_format": "float"}
    )
    assert status == 413 and "200 vectors" in answer["error"]["message"], answer
    assert _items_embedded(gw) == before + 200  # only the gRPC call did work
    status, _, answer = await asyncio.to_thread(
        _post, gw.http_port, "/v1/embeddings", {"input": texts, "encoding_format": "base64"}
    )
    assert status == 200 and len(answer["data"]) == 200


# ---------------------------------------------------------------------------- case 4
def _slow_request(port: int, head_only: bool = False) -> socket.socket:
    """A connection that sends a request's headers and one byte of its 1,000-byte body
    (or half a request line), then nothing."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    if head_only:
        connection.sendall(b"POST /v1/embed")
    else:
        connection.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
    return connection


def _read_to_end(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (60 s at most)."""
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_slow_bodies_take_no_slot_end_with_408_and_are_bounded(
    small_gateway: Gateway,
) -> None:
    """Four connections sending one byte of body held every slot of --max-concurrent-rpcs
    4 (429 for everyone, for minutes). Now a slot is taken once the body is in, a body
    has --http-body-timeout-s to arrive (then 408, connection closed), and at most
    --max-http-body-reads bodies are received at once."""
    gw = small_gateway
    bodies_read = functools.partial(
        metric_reads, gw.metrics_port, "clip_requests_in_flight", method="http:embeddings"
    )
    slow = [_slow_request(gw.http_port) for _ in range(4)]
    try:
        await bodies_read(4, what="four slow bodies being read")
        for _ in range(3):  # well-behaved callers, one after the other, are served
            status, _, answer = await asyncio.to_thread(
                _post, gw.http_port, "/v1/embeddings", {"input": "a red circle"}
            )
            assert status == 200, answer
        more = [_slow_request(gw.http_port) for _ in range(2)]  # 6 bodies being read
        slow += more
        await bodies_read(6, what="six slow bodies being read")
        status, _, answer = await asyncio.to_thread(
            _post, gw.http_port, "/v1/embeddings", {"input": "one too many"}
        )
        assert status == 429 and "--max-http-body-reads" in answer["error"]["message"]
        # Each slow one is answered 408 and its connection closed: nothing stays held.
        for connection in slow:
            reply = await asyncio.to_thread(_read_to_end, connection)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert b"--http-body-timeout-s" in reply
        await bodies_read(0, what="every slow call ended")
        assert sample(scrape(gw.metrics_port), "clip_inflight_request_bytes") == 0
        # A request head that never ends is closed after --http-header-timeout-s.
        head = _slow_request(gw.http_port, head_only=True)
        slow.append(head)
        assert await asyncio.to_thread(_read_to_end, head) == b""
    finally:
        for connection in slow:
            connection.close()


# ---------------------------------------------------------------------------- case 5
@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/v1/embeddings", b'{"input": ["ok", "\\ud800"]}', "surrogate"),
        ("/v1/embeddings", b'{"input": "a\\udfff"}', "surrogate"),
        ("/v1/similarity", b'{"queries": ["\\ud800"], "candidates": ["b"]}', "surrogate"),
        ("/v1/classify", b'{"images": [], "labels": ["cat", "\\ud83d"]}', "surrogate"),
    ],
)
async def test_a_lone_surrogate_is_a_400_on_every_route(
    gateway: Gateway, path: str, body: bytes, says: str
) -> None:
    status, _, answer = await asyncio.to_thread(_post, gateway.http_port, path, body)
    assert status == 400, answer
    assert answer["error"]["code"] == "INVALID_ARGUMENT" and says in answer["error"]["message"]


async def test_text_that_is_not_utf8_is_invalid_argument_on_every_rpc(gateway: Gateway) -> None:
    """Protobuf strings must be UTF-8: a text or label with a lone surrogate encoded
    (CESU bytes ED A0 80) is INVALID_ARGUMENT, not INTERNAL."""
    bad = "\ud800".encode("utf-8", "surrogatepass")
    ok_text = clip_pb2.EmbedTextRequest(texts=["x"]).SerializeToString()
    requests = {
        "EmbedText": ok_text.replace(b"x", bad),
        "Similarity": clip_pb2.SimilarityRequest(
            queries=[clip_pb2.Item(text="x")], candidates=[clip_pb2.Item(text="b")]
        )
        .SerializeToString()
        .replace(b"\x01x", b"\x03" + bad),
        "Classify": clip_pb2.ClassifyRequest(images=[b"i"], labels=["x"])
        .SerializeToString()
        .replace(b"\x01x", b"\x03" + bad),
    }
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        for method, raw in requests.items():
            call = channel.unary_unary(f"/clip.v1.ClipService/{method}")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(raw, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value)
            assert "UTF-8" in (err.value.details() or ""), err.value.details()


# ---------------------------------------------------------------------------- case 8
async def test_unknown_routes_and_methods_answer_in_openais_shape(gateway: Gateway) -> None:
    port = gateway.http_port
    status, _, answer = await asyncio.to_thread(http_raw, port, "/v1/nope")
    assert status == 404 and answer["error"]["type"] == "not_found_error", answer
    assert "/v1/nope" in answer["error"]["message"]
    assert "POST /v1/embeddings" in answer["error"]["message"]
    status, headers, answer = await asyncio.to_thread(http_raw, port, "/v1/embeddings")
    assert status == 405 and answer["error"]["type"] == "invalid_request_error", answer
    assert headers["allow"] == "POST" and "use POST" in answer["error"]["message"]
    status, headers, answer = await asyncio.to_thread(
        http_raw, port, "/v1/models", b"{}", method="DELETE"
    )
    assert status == 405 and "GET" in headers["allow"] and answer["error"]["code"]


# ---------------------------------------------------------------- issue 26 (first pieces)
async def test_an_unknown_field_is_a_400_naming_it(gateway: Gateway) -> None:
    """A misspelt field was silently ignored (`encoding_fromat`: float answers where
    base64 was meant); now refused by name, with the fields the route takes."""
    for path, body, field in (
        ("/v1/embeddings", {"input": "x", "encoding_fromat": "base64"}, "encoding_fromat"),
        ("/v1/classify", {"labels": ["a"], "image": ["x"]}, "image"),
        ("/v1/similarity", {"queries": ["a"], "candidates": ["b"], "top_k": 1}, "top_k"),
        ("/v1/embeddings", {"input": [{"text": "x", "lang": "fr"}]}, "input[0]"),
    ):
        status, _, answer = await asyncio.to_thread(_post, gateway.http_port, path, body)
        assert status == 400, answer
        assert answer["error"]["message"].startswith(f"{field}: "), answer
    status, _, answer = await asyncio.to_thread(
        _post, gateway.http_port, "/v1/embeddings", {"input": "x", "encoding_fromat": "base64"}
    )
    assert "this route takes input, model, encoding_format" in answer["error"]["message"]


POST_ROUTES = (
    "/v1/embeddings",
    "/v1/classify",
    "/v1/similarity",
    "/v1/search",
    "/v1/catalog/items",
    "/v1/catalog/delete",
    "/v1/catalog/get",
)


@pytest.mark.parametrize("path", POST_ROUTES)
async def test_every_post_route_refuses_hostile_json_by_the_same_rules(
    gateway: Gateway, path: str
) -> None:
    """The door's JSON rules on every route that takes a body, the catalog's included
    (they decoded any object and ignored unknown fields): nesting, token count, lone
    surrogates, unknown fields, wrong types, non-objects; then the gateway still answers.
    (Without --catalog, the catalog's routes decode before they answer 501.)"""
    limit = gateway.options.max_message_bytes
    cases = [
        (b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "deeper than 16 levels"),
        (
            b'{"model":[' + b",".join([b"{}"] * ((limit - 16) // 3)) + b"]}",
            "JSON strings, arrays, objects and list elements",
        ),
        (b'{"model": "\\ud800"}', "surrogate"),
        (b'{"zz_unknown": 1}', "zz_unknown: unknown field"),
        (b'{"model": 7}', "model: expected `str | null`, got `int`"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"model": "x', "not valid JSON"),
    ]
    for body, says in cases:
        status, _, answer = await asyncio.to_thread(_post, gateway.http_port, path, body)
        assert status == 400, (body[:40], answer)
        assert says in answer["error"]["message"], (body[:40], answer)
    status, _, _ = await asyncio.to_thread(http_raw, gateway.http_port, "/health")
    assert status == 200
    status, _, answer = await asyncio.to_thread(
        _post, gateway.http_port, "/v1/embeddings", {"input": "a blue star"}
    )
    assert status == 200 and len(answer["data"]) == 1


async def test_one_model_by_its_name(gateway: Gateway) -> None:
    """OpenAI's `GET /v1/models/{model}`: the entry `/v1/models` lists, or a 404."""
    port = gateway.http_port
    status, _, listed = await asyncio.to_thread(http_raw, port, "/v1/models")
    status, _, one = await asyncio.to_thread(http_raw, port, "/v1/models/clip")
    assert status == 200 and one == listed["data"][0] and one["id"] == "clip"
    for missing in ("/v1/models/gpt-4", "/v1/models/"):
        status, _, answer = await asyncio.to_thread(http_raw, port, missing)
        assert status == 404 and "known models: clip" in answer["error"]["message"], answer
