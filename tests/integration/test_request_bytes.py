"""The request byte budget holds what a call's message took on the wire, read where grpc
deserializes it: a real grpc.aio server on loopback with `RequestBytesInterceptor`.

upb's `ByteSize()` encodes the parsed message again (a copy of every image in it, ~10%
of the gateway's CPU on pre-sized pixels) and counts a re-encoding, not what arrived: a
field sent twice is held once. The wire size is what the process holds."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry, Gauge

from service.api.clip.v1 import clip_pb2
from service.core.admission import ByteBudget
from service.server.interceptors import RequestBytesInterceptor

pytestmark = pytest.mark.integration


async def test_the_budget_holds_the_size_received_not_a_re_encoding() -> None:
    gauge = Gauge("held_bytes", "bytes held", registry=CollectorRegistry())
    budget = ByteBudget(1 << 30, gauge)
    seen: list[tuple[int, str]] = []

    async def embed(request: clip_pb2.EmbedTextRequest, context: object) -> bytes:
        seen.append((budget.in_use, request.model))
        return b""

    handler = grpc.unary_unary_rpc_method_handler(
        embed,
        request_deserializer=clip_pb2.EmbedTextRequest.FromString,
        response_serializer=lambda answer: answer,
    )
    server = grpc.aio.server(interceptors=[RequestBytesInterceptor(budget)])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("clip.v1.ClipService", {"EmbedText": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        first = clip_pb2.EmbedTextRequest(model="a" * 50_000, texts=["x"])
        last = clip_pb2.EmbedTextRequest(model="b")
        # Two messages back to back parse as one: `model` sent twice, the last one wins.
        raw = first.SerializeToString() + last.SerializeToString()
        parsed = clip_pb2.EmbedTextRequest.FromString(raw)
        assert parsed.model == "b" and parsed.ByteSize() < len(raw) - 50_000
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/clip.v1.ClipService/EmbedText")
            for _ in range(2):  # each call its own size, none left behind
                assert await call(raw, timeout=30) == b""
    finally:
        await server.stop(None)
    assert seen == [(len(raw), "b"), (len(raw), "b")]
    assert budget.in_use == 0
