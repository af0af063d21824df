"""`clip.v1.ClipService`: one thin function per RPC, proto ⇄ embedder.

Errors are raised, never caught here: the interceptor maps them to status codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.core import lanes, vector_formats
from service.core.calls import AnswerCosts, Calls
from service.core.catalog import Catalog
from service.core.embedder import EmbeddingResult
from service.core.image_preprocess import PresizedPixels
from service.core.models import ServedModel
from service.core.scoring import Item
from service.errors import InvalidInput
from service.server.catalog_servicer import CatalogRpcs
from service.server.status import caller_message, status_for
from service.server.streams import answer_stream

# Longest stream item id echoed back; a longer id gets a per-item INVALID_ARGUMENT.
MAX_STREAM_ID_CHARS = 256
#: Each packed `VectorFormat` → its rule in `vector_formats` (FLOAT_LIST: `values`).
PACKED_FORMATS: dict[int, str] = {
    clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES: vector_formats.FLOAT32,
    clip_pb2.VECTOR_FORMAT_FLOAT16_BYTES: vector_formats.FLOAT16,
    clip_pb2.VECTOR_FORMAT_INT8: vector_formats.INT8,
    clip_pb2.VECTOR_FORMAT_UINT8: vector_formats.UINT8,
    clip_pb2.VECTOR_FORMAT_BINARY: vector_formats.BINARY,
    clip_pb2.VECTOR_FORMAT_UBINARY: vector_formats.UBINARY,
}
#: Bytes per vector element in each `VectorFormat` (FLOAT_LIST: packed repeated floats, 4;
#: the bit formats an eighth, the last byte's padding within `per_vector`).
_VALUE_BYTES = {"VECTOR_FORMAT_FLOAT_LIST": 4.0} | {
    clip_pb2.VectorFormat.Name(fmt): vector_formats.packed_bytes(8, rule) / 8
    for fmt, rule in PACKED_FORMATS.items()
}
#: What protobuf answers cost (framing per repeated element / message rounded up: these
#: are estimates, not exact sizes).
PROTO_COSTS = AnswerCosts(
    per_vector=24,
    per_value=_VALUE_BYTES,
    per_row=24,
    per_score=2 * 10,
    per_label=24,
    label_bytes=lambda label: len(label.encode("utf-8")),
)


def _vector_message(item: EmbeddingResult, fmt: int) -> clip_pb2.Embedding:
    vec = item.vector
    message = clip_pb2.Embedding(
        truncated=item.truncated, cached=item.cached, dim=len(vec), format=fmt
    )
    if fmt in PACKED_FORMATS:
        message.packed = vector_formats.to_bytes(vec, PACKED_FORMATS[fmt])
    else:
        message.values.extend(vec.tolist())
    return message


def _images(images: Sequence[bytes], pixels: Sequence[bytes]) -> list[bytes | PresizedPixels]:
    """A request's `images` or its pre-sized `pixels` (one of the two, never both)."""
    if images and pixels:
        raise InvalidInput(
            f"the request carries both images ({len(images)}) and pixels ({len(pixels)}); "
            "send one kind per request",
            field="pixels",
        )
    return [PresizedPixels(p) for p in pixels] if pixels else list(images)


def lane_of(priority: int, default: lanes.Lane) -> lanes.Lane:
    """A request's `priority` → its lane (`default` when unset); INVALID_ARGUMENT if unknown."""
    if priority == clip_pb2.PRIORITY_UNSPECIFIED:
        return default
    if priority == clip_pb2.PRIORITY_INTERACTIVE:
        return lanes.INTERACTIVE
    if priority == clip_pb2.PRIORITY_BULK:
        return lanes.BULK
    raise InvalidInput(f"unknown priority {priority}", field="priority")


def _format_name(fmt: int) -> str:
    if fmt not in clip_pb2.VectorFormat.values():
        names = ", ".join(clip_pb2.VectorFormat.keys())
        raise InvalidInput(f"unknown vector format {fmt}; one of {names}", field="format")
    return clip_pb2.VectorFormat.Name(fmt)


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


class ClipServicer(CatalogRpcs, clip_pb2_grpc.ClipServiceServicer):
    """Thin translation between the protobuf API and the checked calls of `Calls`."""

    def __init__(self, calls: Calls, *, catalog: Catalog | None = None) -> None:
        """`calls`: the core's calls, weighing answers by `PROTO_COSTS`. `catalog`: the
        catalog RPCs' (None: they answer UNIMPLEMENTED)."""
        self._calls = calls
        self._models = calls.models
        self._catalog = catalog

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        return self._calls.timeout(_remaining(context))

    async def EmbedText(
        self, request: clip_pb2.EmbedTextRequest, context: grpc.aio.ServicerContext
    ) -> clip_pb2.EmbedResponse:
        return await self._embed(request, list(request.texts), "texts", context)

    async def EmbedImage(
        self, request: clip_pb2.EmbedImageRequest, context: grpc.aio.ServicerContext
    ) -> clip_pb2.EmbedResponse:
        images = _images(request.images, request.pixels)
        return await self._embed(request, images, "pixels" if request.pixels else "images", context)

    async def _embed(
        self,
        request: clip_pb2.EmbedTextRequest | clip_pb2.EmbedImageRequest,
        inputs: list[Any],
        field: str,
        context: grpc.aio.ServicerContext,
    ) -> clip_pb2.EmbedResponse:
        fmt = request.format
        language = getattr(request, "language", "") or None
        with lanes.using(lane_of(request.priority, lanes.INTERACTIVE)):
            embedded = await self._calls.embed(
                request.model,
                inputs,
                field=field,
                encoding=_format_name(fmt),
                language=language,
                remaining_s=_remaining(context),
            )
        return clip_pb2.EmbedResponse(
            embeddings=[_vector_message(i, fmt) for i in embedded.results],
            model=embedded.model.embedder.model_id,
        )

    async def Similarity(
        self, request: clip_pb2.SimilarityRequest, context: grpc.aio.ServicerContext
    ) -> clip_pb2.SimilarityResponse:
        with lanes.using(lane_of(request.priority, lanes.INTERACTIVE)):
            compared = await self._calls.similarity(
                request.model,
                _items(request.queries, "queries"),
                _items(request.candidates, "candidates"),
                language=request.language or None,
                remaining_s=_remaining(context),
            )
        result = compared.result
        rows = [
            clip_pb2.Row(scores=scores.tolist(), probabilities=probabilities.tolist())
            for scores, probabilities in zip(result.scores, result.probabilities, strict=True)
        ]
        return clip_pb2.SimilarityResponse(rows=rows, model=compared.model.embedder.model_id)

    async def Classify(
        self, request: clip_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> clip_pb2.ClassifyResponse:
        with lanes.using(lane_of(request.priority, lanes.INTERACTIVE)):
            classified = await self._calls.classify(
                request.model,
                _images(request.images, request.pixels),
                list(request.labels),
                list(request.templates),
                request.top_k,
                language=request.language or None,
                remaining_s=_remaining(context),
            )
        return clip_pb2.ClassifyResponse(
            results=[
                clip_pb2.Classification(
                    labels=[
                        clip_pb2.LabelScore(label=r.label, probability=r.probability, score=r.score)
                        for r in ranked
                    ]
                )
                for ranked in classified.ranked
            ],
            model=classified.model.embedder.model_id,
        )

    async def GetModelInfo(
        self, request: clip_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> clip_pb2.ModelInfo:
        return model_info(self._models.get(request.model))

    async def ListModels(
        self, request: clip_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> clip_pb2.ListModelsResponse:
        return clip_pb2.ListModelsResponse(models=[model_info(m) for m in self._models])

    async def EmbedStream(
        self,
        request_iterator: AsyncIterator[clip_pb2.StreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[clip_pb2.StreamResponse]:
        async def work(request: clip_pb2.StreamRequest) -> clip_pb2.StreamResponse:
            return await self._stream_item(request, context)

        async with contextlib.aclosing(answer_stream(request_iterator, work)) as answers:
            async for answer in answers:
                yield answer

    async def _stream_item(
        self, request: clip_pb2.StreamRequest, context: grpc.aio.ServicerContext
    ) -> clip_pb2.StreamResponse:
        item_id = request.id[:MAX_STREAM_ID_CHARS]
        try:
            if len(request.id) > MAX_STREAM_ID_CHARS:
                raise InvalidInput(
                    f"id is {len(request.id)} characters, over the limit of "
                    f"{MAX_STREAM_ID_CHARS} (the answer carries its first {MAX_STREAM_ID_CHARS})"
                )
            fmt = request.format
            kind = request.WhichOneof("input")
            if kind is None:
                raise InvalidInput("message has neither text nor image set")
            item: Item = (
                request.text
                if kind == "text"
                else PresizedPixels(request.pixels)
                if kind == "pixels"
                else request.image
            )
            # Stream items are bulk work unless the item says otherwise.
            with lanes.using(lane_of(request.priority, lanes.BULK)):
                embedded = await self._calls.embed(
                    request.model,
                    [item],
                    field={"text": "texts", "pixels": "pixels"}.get(kind, "images"),
                    encoding=_format_name(fmt),
                    language=request.language or None,
                    remaining_s=_remaining(context),
                )
            items = embedded.results
            return clip_pb2.StreamResponse(id=item_id, embedding=_vector_message(items[0], fmt))
        except Exception as exc:
            message = exc.reason if isinstance(exc, InvalidInput) else caller_message(exc)
            return clip_pb2.StreamResponse(
                id=item_id,
                error=clip_pb2.StreamError(code=status_for(exc).name, message=message),
            )


def model_info(model: ServedModel) -> clip_pb2.ModelInfo:
    """What `GetModelInfo` and `ListModels` say about one served model."""
    meta = model.embedder.metadata
    return clip_pb2.ModelInfo(
        name=model.name,
        model_name=meta.model_name,
        pretrained=meta.pretrained,
        embedding_dim=meta.embedding_dim,
        image_size=meta.image_size,
        context_length=meta.context_length,
        logit_scale=meta.logit_scale,
        backend=model.embedder.backend_name,
        model_id=meta.model_id,
        weights_sha256=meta.weights_sha256,
        logit_bias=meta.logit_bias or 0.0,
        score_function=meta.score_function,
        languages=list(meta.languages),
        default_language=meta.language or "",
        tokenizer=meta.tokenizer,
        accepts_pixels=True,
        catalog_accepts_pixels=True,
        image_interpolation=meta.interpolation,
        exif_transpose=model.embedder.exif_transpose,
    )


def _items(items: Sequence[clip_pb2.Item], field: str) -> list[Item]:
    """Proto `Item`s → texts (str), image bytes and pre-sized pixels, refusing items with
    none set."""
    out: list[Item] = []
    for index, item in enumerate(items):
        kind = item.WhichOneof("kind")
        if kind is None:
            raise InvalidInput("item has neither text nor image set", field=field, index=index)
        if kind == "text":
            out.append(item.text)
        elif kind == "pixels":
            out.append(PresizedPixels(item.pixels))
        else:
            out.append(item.image)
    return out
