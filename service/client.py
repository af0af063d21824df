"""Python client for `clip.v1.ClipService`: sync (`ClipClient`) and asyncio (`AsyncClipClient`).

Vectors come back as numpy arrays (`float32 [N, D]`); they travel as packed float32
bytes, which is smaller and faster than repeated floats. `vector_format` asks for a
compact format instead (`int8`, `uint8`: `[N, D]` of that type; `binary` (int8),
`ubinary` (uint8): `[N, ceil(D/8)]` of packed sign bits; `float16`), quantized by the
server with the rules in `service/core/vector_formats.py`.

With `local_preprocess=True`, `embed_image` and `classify` decode, resize and crop the
images here, in a process pool of `workers` processes, with the gateway's own code, and
send the model's pixels (`EmbedImageRequest.pixels`) when the server takes them: the
same vectors, bit for bit, for a fraction of the gateway's CPU (`service/client_pixels.py`).

Refusals for load (RESOURCE_EXHAUSTED, UNAVAILABLE) that carry the server's hint
(`grpc-retry-pushback-ms`, derived from its queue) are retried after that long plus up
to half again of random jitter (so refused callers do not come back in step), as long as
the wait and the next try fit in the call's timeout; refusals without a hint (too large,
bad input) are raised at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.client_pixels import PixelPool, PixelRecipe, source_of
from service.core import vector_formats
from service.core.image_preprocess import PresizedPixels

ImageInput = bytes | str | Path

#: What the server sends to say when to come back (gRFC A6's name).
_PUSHBACK_KEY = "grpc-retry-pushback-ms"
_RETRIED_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


@dataclass(frozen=True)
class RetryPolicy:
    """How refused calls are retried: at most `max_attempts` tries in all; each wait is the
    server's hint × (1 + uniform(0, `jitter`)). `RetryPolicy(max_attempts=1)`: never."""

    max_attempts: int = 5
    jitter: float = 0.5


def pushback_s(error: grpc.RpcError) -> float | None:
    """The server's retry hint in seconds, for a load refusal that carries one; else None."""
    code = error.code() if hasattr(error, "code") else None
    if code not in _RETRIED_CODES or not hasattr(error, "trailing_metadata"):
        return None
    for key, value in error.trailing_metadata() or ():
        if key == _PUSHBACK_KEY:
            try:
                millis = int(value)
            except ValueError:
                return None
            return millis / 1000.0 if millis >= 0 else None  # negative: do not retry
    return None


class _Retries:
    """One call's retry state: its deadline, tries made, and the next wait (or None)."""

    def __init__(self, policy: RetryPolicy, timeout_s: float | None) -> None:
        self._policy = policy
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._tries = 0

    def timeout(self) -> float | None:
        """What the next try may take: the rest of the call's timeout."""
        self._tries += 1
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def wait_after(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before another try, or None to raise `error` now."""
        hint = pushback_s(error)
        if hint is None or self._tries >= self._policy.max_attempts:
            return None
        wait = hint * (1.0 + random.uniform(0.0, self._policy.jitter))
        # A try that starts just before the deadline cannot succeed: keep a tenth of a second.
        if self._deadline is not None and time.monotonic() + wait + 0.1 >= self._deadline:
            return None
        return wait


@dataclass(frozen=True)
class Embeddings:
    """Vectors of one call with per-item flags."""

    vectors: np.ndarray
    truncated: list[bool]
    cached: list[bool]
    model: str


@dataclass(frozen=True)
class Label:
    """One zero-shot label's result."""

    label: str
    probability: float
    score: float


#: Each `vector_format` name → the `VectorFormat` asked for on the wire.
WIRE_FORMATS: dict[str, int] = {
    vector_formats.FLOAT32: clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES,
    vector_formats.FLOAT16: clip_pb2.VECTOR_FORMAT_FLOAT16_BYTES,
    vector_formats.INT8: clip_pb2.VECTOR_FORMAT_INT8,
    vector_formats.UINT8: clip_pb2.VECTOR_FORMAT_UINT8,
    vector_formats.BINARY: clip_pb2.VECTOR_FORMAT_BINARY,
    vector_formats.UBINARY: clip_pb2.VECTOR_FORMAT_UBINARY,
}
_NAMES = {wire: name for name, wire in WIRE_FORMATS.items()}


def decode_embedding(message: clip_pb2.Embedding) -> np.ndarray:
    """One `Embedding` message → its values: `float32 [D]` for the float formats, the
    compact formats' own type and width (`int8 [D]`, `uint8 [ceil(D/8)]`, ...)."""
    if message.format in _NAMES:
        return vector_formats.from_bytes(message.packed, _NAMES[message.format])
    if message.packed:  # a server from before `Embedding.format`: floats, told by size
        dtype = "<f2" if len(message.packed) == 2 * message.dim else "<f4"
        return np.frombuffer(message.packed, dtype=dtype).astype(np.float32)
    return np.asarray(message.values, dtype=np.float32)


def _wire_format(name: str) -> int:
    try:
        return WIRE_FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown vector_format {name!r}; one of {', '.join(WIRE_FORMATS)}"
        ) from None


def _image_bytes(image: ImageInput) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _embeddings(response: clip_pb2.EmbedResponse, dim_hint: int = 0) -> Embeddings:
    vectors = [decode_embedding(e) for e in response.embeddings]
    matrix = np.stack(vectors) if vectors else np.zeros((0, dim_hint), dtype=np.float32)
    return Embeddings(
        vectors=matrix,
        truncated=[e.truncated for e in response.embeddings],
        cached=[e.cached for e in response.embeddings],
        model=response.model,
    )


def _item(value: str | bytes | Path) -> clip_pb2.Item:
    if isinstance(value, str):
        return clip_pb2.Item(text=value)
    return clip_pb2.Item(image=_image_bytes(value))


def _classify_request(
    images: Sequence[ImageInput],
    labels: Sequence[str],
    templates: Sequence[str],
    top_k: int,
    model: str,
    pixels: list[bytes] | None = None,
) -> clip_pb2.ClassifyRequest:
    return clip_pb2.ClassifyRequest(
        images=[] if pixels is not None else [_image_bytes(i) for i in images],
        pixels=pixels or [],
        labels=list(labels),
        templates=list(templates),
        top_k=top_k,
        model=model,
    )


def _labels(response: clip_pb2.ClassifyResponse) -> list[list[Label]]:
    return [
        [Label(s.label, s.probability, s.score) for s in result.labels]
        for result in response.results
    ]


def _connect(
    transport: Any,
    target: str,
    api_key: str | None,
    tls: bool,
    tls_ca: bytes | None,
    max_message_bytes: int,
) -> tuple[Any, list[tuple[str, str]]]:
    """A channel from `grpc` or `grpc.aio` (same factory names) and the call metadata."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # A headless Service (`dns:///clip-gateway-headless:50051`) or `ipv4:a:p,b:p`:
        # spread calls over every gateway. Behind a ClusterIP a gRPC client keeps one
        # connection, so all its calls would go to one pod.
        ("grpc.lb_policy_name", "round_robin"),
    ]
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
    if tls or tls_ca:
        creds = grpc.ssl_channel_credentials(root_certificates=tls_ca)
        return transport.secure_channel(target, creds, options=options), metadata
    return transport.insecure_channel(target, options=options), metadata


#: `priority=` values: "" leaves the server's default (interactive; bulk for streams).
PRIORITIES = {
    "": clip_pb2.PRIORITY_UNSPECIFIED,
    "interactive": clip_pb2.PRIORITY_INTERACTIVE,
    "bulk": clip_pb2.PRIORITY_BULK,
}


def _priority(name: str) -> int:
    if name not in PRIORITIES:
        raise ValueError(f"priority must be one of {sorted(PRIORITIES)}, not {name!r}")
    return PRIORITIES[name]


def _text_request(
    texts: Sequence[str], model: str, vector_format: str, priority: str = ""
) -> clip_pb2.EmbedTextRequest:
    return clip_pb2.EmbedTextRequest(
        texts=list(texts),
        format=_wire_format(vector_format),
        model=model,
        priority=_priority(priority),
    )


def _image_request(
    images: Sequence[ImageInput],
    model: str,
    vector_format: str,
    pixels: list[bytes] | None = None,
    priority: str = "",
) -> clip_pb2.EmbedImageRequest:
    fmt = _wire_format(vector_format)
    if pixels is not None:
        return clip_pb2.EmbedImageRequest(pixels=pixels, format=fmt, model=model)
    return clip_pb2.EmbedImageRequest(
        images=[_image_bytes(i) for i in images],
        format=fmt,
        model=model,
        priority=_priority(priority),
    )


class _LocalPixels:
    """What both clients need to send pixels: the pool and each model's recipe."""

    def __init__(self, enabled: bool, workers: int | None, fast_jpeg: bool) -> None:
        self.pool = PixelPool(workers) if enabled else None
        self.fast_jpeg = fast_jpeg
        self.recipes: dict[str, PixelRecipe | None] = {}

    def recipe(self, model: str, info: clip_pb2.ModelInfo) -> PixelRecipe | None:
        recipe = PixelRecipe.from_model_info(info, fast_jpeg=self.fast_jpeg)
        self.recipes[model] = recipe
        return recipe

    @staticmethod
    def complete(made: list[bytes | None]) -> list[bytes] | None:
        """All pixels, or None when one image failed here: then the request goes as
        encoded images and the server names the bad one."""
        return None if any(m is None for m in made) else [m for m in made if m is not None]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def _similarity_request(
    queries: Sequence[str | bytes | Path], candidates: Sequence[str | bytes | Path], model: str
) -> clip_pb2.SimilarityRequest:
    return clip_pb2.SimilarityRequest(
        queries=[_item(q) for q in queries],
        candidates=[_item(c) for c in candidates],
        model=model,
    )


StreamValue = str | bytes | PresizedPixels


def stream_request(
    item_id: str,
    value: StreamValue,
    model: str = "",
    vector_format: str = vector_formats.FLOAT32,
    priority: str = "",
) -> clip_pb2.StreamRequest:
    """One EmbedStream message: a str is a text, bytes an encoded image, `PresizedPixels`
    the model's pixels."""
    fmt, level = _wire_format(vector_format), _priority(priority)
    if isinstance(value, str):
        return clip_pb2.StreamRequest(
            id=item_id, text=value, format=fmt, model=model, priority=level
        )
    if isinstance(value, PresizedPixels):
        return clip_pb2.StreamRequest(
            id=item_id, pixels=value.data, format=fmt, model=model, priority=level
        )
    return clip_pb2.StreamRequest(id=item_id, image=value, format=fmt, model=model, priority=level)


class ClipClient:
    """Blocking client. `with ClipClient("localhost:50051") as c: c.embed_text([...])`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: bytes | None = None,
        timeout_s: float | None = 60.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        local_preprocess: bool = False,
        workers: int | None = None,
        fast_jpeg: bool = False,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        """`timeout_s` bounds each call, its retries included; `retry`: how load refusals
        are retried (the server's hint, jittered). `local_preprocess`: make pixels here
        (`workers` processes, default one per CPU; `fast_jpeg`: reduced-size JPEG decoding,
        not bit-identical) and send them when the server takes them."""
        self._channel, self._metadata = _connect(
            grpc, target, api_key, tls, tls_ca, max_message_bytes
        )
        self.stub = clip_pb2_grpc.ClipServiceStub(self._channel)
        self._timeout = timeout_s
        self._local = _LocalPixels(local_preprocess, workers, fast_jpeg)
        self._retry = retry

    def __enter__(self) -> ClipClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel (and stop the pixel workers)."""
        self._channel.close()
        self._local.close()

    def _call(self, method: str, request: Any) -> Any:
        retries = _Retries(self._retry, self._timeout)
        while True:
            try:
                return getattr(self.stub, method)(
                    request, timeout=retries.timeout(), metadata=self._metadata
                )
            except grpc.RpcError as error:
                wait = retries.wait_after(error)
                if wait is None:
                    raise
                time.sleep(wait)

    def pixel_recipe(self, model: str = "") -> PixelRecipe | None:
        """How to make pixels for `model` (asked once), or None: local preprocessing is
        off, or the server takes no pixels."""
        if self._local.pool is None:
            return None
        if model in self._local.recipes:
            return self._local.recipes[model]
        return self._local.recipe(model, self.model_info(model))

    def _pixels(self, images: Sequence[ImageInput], model: str) -> list[bytes] | None:
        recipe = self.pixel_recipe(model)
        if recipe is None or self._local.pool is None or not images:
            return None
        made = self._local.pool.make([source_of(i) for i in images], recipe)
        return self._local.complete(made)

    def embed_text(
        self,
        texts: Sequence[str],
        *,
        model: str = "",
        vector_format: str = "float32",
        priority: str = "",
    ) -> Embeddings:
        """`float32 [N, D]` (or `vector_format`'s values) for `texts`, by model `model`
        ('' = the server's default); `priority` "bulk" for indexing work ('' = interactive)."""
        request = _text_request(texts, model, vector_format, priority)
        return _embeddings(self._call("EmbedText", request))

    def embed_image(
        self,
        images: Sequence[ImageInput],
        *,
        model: str = "",
        vector_format: str = "float32",
        priority: str = "",
    ) -> Embeddings:
        """`float32 [N, D]` (or `vector_format`'s values) for encoded images (bytes or file
        paths), by model `model`; `priority` "bulk" for indexing work ('' = interactive)."""
        request = _image_request(
            images, model, vector_format, self._pixels(images, model), priority
        )
        return _embeddings(self._call("EmbedImage", request))

    def similarity(
        self,
        queries: Sequence[str | bytes | Path],
        candidates: Sequence[str | bytes | Path],
        *,
        model: str = "",
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cosine `[Q, C]`, probabilities `[Q, C]` by the model's score rule); str = text,
        bytes/Path = image."""
        return _matrices(self._call("Similarity", _similarity_request(queries, candidates, model)))

    def classify(
        self,
        images: Sequence[ImageInput],
        labels: Sequence[str],
        *,
        templates: Sequence[str] = (),
        top_k: int = 0,
        model: str = "",
    ) -> list[list[Label]]:
        """Zero-shot labels per image, most probable first."""
        pixels = self._pixels(images, model)
        request = _classify_request(images, labels, templates, top_k, model, pixels)
        return _labels(self._call("Classify", request))

    def model_info(self, model: str = "") -> clip_pb2.ModelInfo:
        """What the server serves as `model` ('' = its default)."""
        return self._call("GetModelInfo", clip_pb2.GetModelInfoRequest(model=model))

    def list_models(self) -> list[clip_pb2.ModelInfo]:
        """Every model the server serves, its default first (`ModelInfo.name` to ask for it)."""
        answer = self._call("ListModels", clip_pb2.ListModelsRequest())
        return list(answer.models)

    def embed_stream(
        self,
        items: Iterable[tuple[str, StreamValue]],
        *,
        model: str = "",
        vector_format: str = "float32",
        priority: str = "bulk",
    ) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
        """Bulk: (id, text, image bytes or `PresizedPixels`) in → (id, vector or None, error
        or None) out; the bulk lane unless `priority` says "interactive"."""
        _wire_format(vector_format)  # an unknown name fails here, not inside the stream
        _priority(priority)
        requests = (
            stream_request(item_id, value, model, vector_format, priority)
            for item_id, value in items
        )
        for answer in self.stub.EmbedStream(requests, metadata=self._metadata):
            yield _stream_answer(answer)


class AsyncClipClient:
    """asyncio client with the same methods as `ClipClient`, awaited."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: bytes | None = None,
        timeout_s: float | None = 60.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        local_preprocess: bool = False,
        workers: int | None = None,
        fast_jpeg: bool = False,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        """`local_preprocess`, `workers`, `fast_jpeg`, `retry`: as `ClipClient`'s."""
        self._channel, self._metadata = _connect(
            grpc.aio, target, api_key, tls, tls_ca, max_message_bytes
        )
        self.stub = clip_pb2_grpc.ClipServiceStub(self._channel)
        self._timeout = timeout_s
        self._local = _LocalPixels(local_preprocess, workers, fast_jpeg)
        self._retry = retry

    async def __aenter__(self) -> AsyncClipClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (and stop the pixel workers)."""
        await self._channel.close()
        self._local.close()

    async def _call(self, method: str, request: Any) -> Any:
        stub_method = getattr(self.stub, method)
        retries = _Retries(self._retry, self._timeout)
        while True:
            try:
                return await stub_method(
                    request, timeout=retries.timeout(), metadata=self._metadata
                )
            except grpc.aio.AioRpcError as error:
                wait = retries.wait_after(error)
                if wait is None:
                    raise
                await asyncio.sleep(wait)

    async def pixel_recipe(self, model: str = "") -> PixelRecipe | None:
        """How to make pixels for `model` (asked once), or None: local preprocessing is
        off, or the server takes no pixels."""
        if self._local.pool is None:
            return None
        if model in self._local.recipes:
            return self._local.recipes[model]
        return self._local.recipe(model, await self.model_info(model))

    async def _pixels(self, images: Sequence[ImageInput], model: str) -> list[bytes] | None:
        recipe = await self.pixel_recipe(model)
        if recipe is None or self._local.pool is None or not images:
            return None
        made = await self._local.pool.amake_many([source_of(i) for i in images], recipe)
        return self._local.complete(made)

    async def embed_text(
        self,
        texts: Sequence[str],
        *,
        model: str = "",
        vector_format: str = "float32",
        priority: str = "",
    ) -> Embeddings:
        """`float32 [N, D]` (or `vector_format`'s values) for `texts`, by model `model`
        ('' = the server's default); `priority` as `ClipClient`'s."""
        request = _text_request(texts, model, vector_format, priority)
        return _embeddings(await self._call("EmbedText", request))

    async def embed_image(
        self,
        images: Sequence[ImageInput],
        *,
        model: str = "",
        vector_format: str = "float32",
        priority: str = "",
    ) -> Embeddings:
        """`float32 [N, D]` (or `vector_format`'s values) for encoded images (bytes or file
        paths), by model `model`; `priority` as `ClipClient`'s."""
        pixels = await self._pixels(images, model)
        request = _image_request(images, model, vector_format, pixels, priority)
        return _embeddings(await self._call("EmbedImage", request))

    async def similarity(
        self,
        queries: Sequence[str | bytes | Path],
        candidates: Sequence[str | bytes | Path],
        *,
        model: str = "",
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cosine `[Q, C]`, probabilities `[Q, C]` by the model's score rule)."""
        return _matrices(
            await self._call("Similarity", _similarity_request(queries, candidates, model))
        )

    async def classify(
        self,
        images: Sequence[ImageInput],
        labels: Sequence[str],
        *,
        templates: Sequence[str] = (),
        top_k: int = 0,
        model: str = "",
    ) -> list[list[Label]]:
        """Zero-shot labels per image, most probable first."""
        pixels = await self._pixels(images, model)
        request = _classify_request(images, labels, templates, top_k, model, pixels)
        return _labels(await self._call("Classify", request))

    async def model_info(self, model: str = "") -> clip_pb2.ModelInfo:
        """What the server serves as `model` ('' = its default)."""
        return await self._call("GetModelInfo", clip_pb2.GetModelInfoRequest(model=model))

    async def list_models(self) -> list[clip_pb2.ModelInfo]:
        """Every model the server serves, its default first (`ModelInfo.name` to ask for it)."""
        answer = await self._call("ListModels", clip_pb2.ListModelsRequest())
        return list(answer.models)

    async def embed_stream(
        self,
        items: AsyncIterable[tuple[str, StreamValue]] | Iterable[tuple[str, StreamValue]],
        *,
        model: str = "",
        vector_format: str = "float32",
        priority: str = "bulk",
    ) -> AsyncIterator[tuple[str, np.ndarray | None, str | None]]:
        """Bulk over EmbedStream: (id, text, image bytes or `PresizedPixels`) in; (id, vector,
        error) as they come (the bulk lane unless `priority` says "interactive")."""
        _wire_format(vector_format)  # an unknown name fails here, not inside the stream
        _priority(priority)

        async def requests() -> AsyncIterator[clip_pb2.StreamRequest]:
            if isinstance(items, AsyncIterable):
                async for item_id, value in items:
                    yield stream_request(item_id, value, model, vector_format, priority)
            else:
                for item_id, value in items:
                    yield stream_request(item_id, value, model, vector_format, priority)

        async for answer in self.stub.EmbedStream(requests(), metadata=self._metadata):
            yield _stream_answer(answer)

    async def catalog_add(
        self,
        items: AsyncIterable[clip_pb2.CatalogItem] | Iterable[clip_pb2.CatalogItem],
    ) -> AsyncIterator[clip_pb2.CatalogAddResult]:
        """Bulk over CatalogAdd: items in, one result per item (stored, or its error) as
        they come; the stream's flow control bounds what is read ahead."""

        async def requests() -> AsyncIterator[clip_pb2.CatalogItem]:
            if isinstance(items, AsyncIterable):
                async for item in items:
                    yield item
            else:
                for item in items:
                    yield item

        async for answer in self.stub.CatalogAdd(requests(), metadata=self._metadata):
            yield answer

    async def catalog_get(self, ids: Sequence[str], *, model: str = "") -> dict[str, str]:
        """Stored ids among `ids` → the SHA-256 of what was embedded for them."""
        answer = await self._call("CatalogGet", clip_pb2.CatalogGetRequest(ids=ids, model=model))
        return {entry.id: entry.content_sha256 for entry in answer.entries}

    async def search(
        self,
        query: str | bytes | Path | PresizedPixels | None = None,
        *,
        like: str = "",
        top_k: int = 10,
        filter_json: str = "",
        model: str = "",
    ) -> list[clip_pb2.SearchHit]:
        """The catalog's items nearest a text, an image (bytes or a file path) or
        pre-sized pixels; or, with `like` (and no query), nearest the stored item of that
        id, which is left out."""
        if (query is None) == (not like):
            raise ValueError("search takes a query or `like`, exactly one of them")
        request = clip_pb2.SearchRequest(top_k=top_k, filter_json=filter_json, model=model)
        if like:
            request.item_id = like
        elif isinstance(query, str):
            request.text = query
        elif isinstance(query, PresizedPixels):
            request.pixels = query.data
        else:
            request.image = _image_bytes(query)
        return list((await self._call("Search", request)).hits)


def _matrices(response: clip_pb2.SimilarityResponse) -> tuple[np.ndarray, np.ndarray]:
    scores = np.array([list(r.scores) for r in response.rows], dtype=np.float32)
    probs = np.array([list(r.probabilities) for r in response.rows], dtype=np.float32)
    return scores, probs


def _stream_answer(answer: clip_pb2.StreamResponse) -> tuple[str, np.ndarray | None, str | None]:
    if answer.WhichOneof("result") == "embedding":
        return answer.id, decode_embedding(answer.embedding), None
    return answer.id, None, f"{answer.error.code}: {answer.error.message}"
