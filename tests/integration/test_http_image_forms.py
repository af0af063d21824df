"""Images in the forms other servers take, over HTTP with the official `openai` client
(issue 26): infinity's `"modality": "image"` with data: URIs, base64 or URLs; OpenAI-style
`image_url` content parts; data: URIs never embedded as text; token ids refused with
LangChain's fix named; and image URLs fetched from a real HTTP server on loopback, only
within `--image-url-allow`, `--max-image-bytes`, `--image-url-timeout-s` and the
request-byte budget."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import http.server
import threading
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qs, urlsplit

import numpy as np
import openai
import pytest

from service.core.image_fetch import FetchOptions, ImageFetcher
from service.errors import InvalidInput
from service.processes.gateway import gateway_settings, running_gateway
from service.server.app import Gateway
from tests.support.http_json import http_json, image_input
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.reference import reference_images

pytestmark = pytest.mark.integration

TOL = 1e-5
MAX_IMAGE_BYTES = 100_000
#: --max-inflight-request-bytes: /medium (95 kB) fits alone, not beside a 67 kB body.
BUDGET = 150_000
IMAGE = encode(photo_like(90, 70, seed=7), "PNG")
OTHER = encode(photo_like(64, 80, seed=8), "PNG")
DATA_URI = "data:image/png;base64," + base64.b64encode(IMAGE).decode()


class _ImageServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class _Handler(http.server.BaseHTTPRequestHandler):
    """/img.png, /other.png, /big (over --max-image-bytes), /medium (over the budget),
    /slow (answers after 3 s), /redirect?to=URL (302), anything else 404."""

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if parts.path == "/slow":
            time.sleep(3.0)
        if parts.path == "/gzip":  # 50 MB of zeros in ~50 kB, sent though not asked for
            packed = gzip.compress(b"\0" * 50_000_000, compresslevel=9)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(packed)))
            self.end_headers()
            self.wfile.write(packed)
            return
        bodies = {
            "/img.png": IMAGE,
            "/other.png": OTHER,
            "/slow": IMAGE,
            "/big": b"\0" * (MAX_IMAGE_BYTES + 50_000),
            "/medium": b"\0" * 95_000,
        }
        body = bodies.get(parts.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if parts.path != "/big":  # the cap must hold while reading, not only on the header
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway stopped reading: what the cap is for

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[int]:
    server = _ImageServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
async def gateway(demo_model: ExportedModel, image_server: int) -> AsyncIterator[Gateway]:
    settings = gateway_settings(
        demo_model.repository,
        # 127.0.0.1 named exactly (loopback allowed for it); localhost only by suffix.
        image_url_allow=("127.0.0.1", ".localhost"),
        image_url_timeout_s=1.0,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_inflight_request_bytes=BUDGET,
    )
    async with running_gateway(settings) as gw:
        yield gw


def _client(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{gw.http_port}/v1", api_key="unused", max_retries=0
    )


def _vectors(answer: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    return np.asarray([d.embedding for d in answer.data], dtype=np.float32)


async def _refused(gw: Gateway, status: int, message: str, **create: object) -> None:
    """`client.embeddings.create(**create)` is answered `status` with `message` in it."""
    async with _client(gw) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.embeddings.create(model="clip", **create)  # type: ignore[arg-type]
    assert caught.value.status_code == status, caught.value.message
    assert message in caught.value.message, caught.value.message


def _budget_in_use(gw: Gateway) -> float:
    return gw.metrics.inflight_request_bytes._value.get()


async def test_every_image_form_gives_the_image_vector(
    gateway: Gateway, demo_model: ExportedModel, image_server: int
) -> None:
    want = reference_images(demo_model, [IMAGE, OTHER])
    url = f"http://127.0.0.1:{image_server}/img.png"
    async with _client(gateway) as client:
        direct = _vectors(
            await client.embeddings.create(model="clip", input=[image_input(IMAGE)])  # type: ignore[list-item]
        )
        # infinity's convention: a data: URI, plain base64, and a URL, in one request.
        infinity = await client.embeddings.create(
            model="clip",
            input=[DATA_URI, base64.b64encode(IMAGE).decode(), url],
            extra_body={"modality": "image"},
        )
        # OpenAI-style content parts, mixed with a text part.
        parts = await client.embeddings.create(
            model="clip",
            input=[  # type: ignore[list-item]
                {"type": "image_url", "image_url": {"url": DATA_URI}},
                {"type": "image_url", "image_url": {"url": f"{url[:-7]}other.png"}},
                {"type": "text", "text": "a red circle"},
            ],
        )
    np.testing.assert_allclose(direct[0], want[0], atol=TOL)
    got = _vectors(infinity)
    assert got.shape == (3, want.shape[1])
    for row in got:  # the fetched bytes embed exactly as the same bytes sent inline
        np.testing.assert_array_equal(row, direct[0])
    mixed = _vectors(parts)
    np.testing.assert_array_equal(mixed[0], direct[0])
    np.testing.assert_allclose(mixed[1], want[1], atol=TOL)
    assert abs(float(mixed[2] @ direct[0])) < 0.99  # the text part stayed a text
    assert _budget_in_use(gateway) == 0  # the fetched bytes were given back


async def test_classify_and_similarity_take_urls_and_answer_the_model_name(
    gateway: Gateway, image_server: int
) -> None:
    url = f"http://127.0.0.1:{image_server}/img.png"
    inline = base64.b64encode(IMAGE).decode()
    status, by_url = await asyncio.to_thread(
        http_json, gateway.http_port, "/v1/classify", {"images": [url], "labels": ["a", "b"]}
    )
    _, by_bytes = await asyncio.to_thread(
        http_json, gateway.http_port, "/v1/classify", {"images": [inline], "labels": ["a", "b"]}
    )
    assert status == 200, by_url
    assert by_url["results"] == by_bytes["results"]
    assert by_url["model"] == "clip"  # the name, not the model id (name/pretrained)
    status, similarity = await asyncio.to_thread(
        http_json,
        gateway.http_port,
        "/v1/similarity",
        {
            "queries": [{"type": "image_url", "image_url": {"url": url}}, {"image": inline}],
            "candidates": ["a red circle", {"image_url": DATA_URI}],
            "model": "clip",
        },
    )
    assert status == 200, similarity
    assert similarity["rows"][0] == similarity["rows"][1]
    assert similarity["model"] == "clip"


async def test_a_data_uri_is_never_embedded_as_text(gateway: Gateway) -> None:
    await _refused(gateway, 400, "input[0]: is a data: URI, which is not embedded", input=DATA_URI)
    await _refused(
        gateway, 400, '"modality": "image"', input=["a cat", DATA_URI], extra_body={"user": "u"}
    )
    await _refused(
        gateway,
        400,
        "input[1]: is not an image",
        input=[DATA_URI, "a photo of a cat"],
        extra_body={"modality": "image"},
    )


async def test_token_ids_are_refused_with_langchains_fix(gateway: Gateway) -> None:
    await _refused(gateway, 400, "check_embedding_ctx_length=False", input=[[1, 2, 3]])
    await _refused(gateway, 400, "check_embedding_ctx_length=False", input=[5, 6])


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        # Not in the allow list, before anything is resolved or fetched.
        ("http://images.example.invalid/a.png", 400, "is not in --image-url-allow"),
        ("http://169.254.169.254/latest/meta-data", 400, "is not in --image-url-allow"),
        ("ftp://127.0.0.1/a.png", 400, "is not an image"),
        # localhost matches only by suffix: its loopback address is refused.
        ("http://localhost:{port}/img.png", 400, "a private, loopback or link-local address"),
        # A redirect from an allowed host to a refused address, and to a refused host.
        (
            "http://127.0.0.1:{port}/redirect?to=http://localhost:{port}/img.png",
            400,
            "'localhost' is at 127.0.0.1, a private, loopback",
        ),
        (
            "http://127.0.0.1:{port}/redirect?to=http://169.254.169.254/x",
            400,
            "host '169.254.169.254' is not in --image-url-allow",
        ),
        ("http://127.0.0.1:{port}/big", 413, f"over the limit of {MAX_IMAGE_BYTES} bytes"),
        ("http://127.0.0.1:{port}/slow", 400, "did not finish within 1 s"),
        # Never inflated here: the compressed bytes are what came, and they are no image.
        ("http://127.0.0.1:{port}/gzip", 400, "not a decodable image"),
        ("http://127.0.0.1:{port}/missing.png", 400, "answered HTTP 404"),
    ],
)
async def test_urls_are_fetched_only_within_the_rules(
    gateway: Gateway, image_server: int, path: str, status: int, message: str
) -> None:
    url = path.format(port=image_server)
    await _refused(gateway, status, message, input=[url], extra_body={"modality": "image"})
    await _refused(
        gateway,
        status,
        message,
        input=[{"type": "image_url", "image_url": {"url": url}}],  # type: ignore[list-item]
    )
    assert _budget_in_use(gateway) == 0


async def test_url_fetching_is_off_by_default() -> None:
    fetcher = ImageFetcher(FetchOptions(allow=(), max_bytes=MAX_IMAGE_BYTES, timeout_s=1.0))
    with pytest.raises(InvalidInput, match="start it with --image-url-allow") as caught:
        await fetcher.fetch("http://127.0.0.1/a.png", lambda n: None, field="input", index=0)
    assert caught.value.index == 0


async def test_fetched_bytes_count_in_the_request_byte_budget(
    gateway: Gateway, image_server: int
) -> None:
    inline = {"image": base64.b64encode(b"\0" * 50_000).decode()}  # a 67 kB body
    medium = {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{image_server}/medium"}}
    await _refused(gateway, 429, "--max-inflight-request-bytes", input=[inline, medium])
    assert _budget_in_use(gateway) == 0


async def test_a_host_named_exactly_is_fetched_through_its_checked_addresses(
    image_server: int,
) -> None:
    # `localhost` named exactly: its loopback address is allowed, and the connection goes
    # through the pinned resolver (the addresses checked), not a second DNS lookup.
    fetcher = ImageFetcher(
        FetchOptions(allow=("localhost",), max_bytes=MAX_IMAGE_BYTES, timeout_s=5.0)
    )
    taken: list[int] = []
    data = await fetcher.fetch(
        f"http://localhost:{image_server}/img.png", taken.append, field="input", index=0
    )
    assert data == IMAGE and sum(taken) == len(IMAGE)


async def test_catalog_items_and_searches_take_image_urls_each_item_failing_alone(
    demo_model: ExportedModel, image_server: int, tmp_path
) -> None:
    """The catalog's HTTP routes fetch image URLs by the same rules as /v1/embeddings;
    an item whose fetch is refused gets that error alone, the others are stored."""
    settings = gateway_settings(
        demo_model.repository,
        image_url_allow=("127.0.0.1",),
        image_url_timeout_s=1.0,
        max_image_bytes=MAX_IMAGE_BYTES,
        catalog=str(tmp_path / "catalog.db"),
    )
    base = f"http://127.0.0.1:{image_server}"
    async with running_gateway(settings) as gw:
        items = {
            "by_url": f"{base}/img.png",
            "inline": base64.b64encode(IMAGE).decode(),
            "missing": f"{base}/missing.png",
            "too_big": f"{base}/big",
            "elsewhere": "http://169.254.169.254/latest/meta-data",
            "other": f"{base}/other.png",
        }
        status, body = await asyncio.to_thread(
            http_json,
            gw.http_port,
            "/v1/catalog/items",
            {"items": [{"id": k, "image": v} for k, v in items.items()]},
        )
        assert status == 200, body
        results = {r["id"]: r for r in body["results"]}
        sha = hashlib.sha256(IMAGE).hexdigest()
        assert results["by_url"] == {"id": "by_url", "content_sha256": sha}
        assert results["inline"] == {"id": "inline", "content_sha256": sha}
        assert "content_sha256" in results["other"]
        assert "answered HTTP 404" in results["missing"]["error"]["message"]
        assert (
            f"over the limit of {MAX_IMAGE_BYTES} bytes" in results["too_big"]["error"]["message"]
        )
        assert "is not in --image-url-allow" in results["elsewhere"]["error"]["message"]
        status, body = await asyncio.to_thread(
            http_json, gw.http_port, "/v1/search", {"image": f"{base}/img.png", "top_k": 2}
        )
        assert status == 200, body
        assert sorted(h["id"] for h in body["hits"]) == ["by_url", "inline"]
        assert all(abs(h["score"] - 1.0) < 1e-5 for h in body["hits"]), body
        status, body = await asyncio.to_thread(
            http_json, gw.http_port, "/v1/search", {"image": f"{base}/missing.png"}
        )
        assert status == 400 and body["error"]["message"].startswith("image: "), body
        assert "answered HTTP 404" in body["error"]["message"]
