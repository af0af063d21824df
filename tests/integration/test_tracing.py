"""OpenTelemetry traces through a real gateway: in memory (every span and attribute), and
over OTLP to a receiver on loopback, with a real tritonserver tracing too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bench.otlp import OtlpReceiver, ReceivedSpan
from service.api.clip.v1 import clip_pb2
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.triton_server import opentelemetry_args
from service.settings import Settings
from service.telemetry import NO_TRACER, build_tracer_provider
from tests.support.gateway import stub_for
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.triton import start_triton

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
# Traced calls (each waited for this long) until Triton's spans arrive under one.
OTLP_CALLS = 3
OTLP_WAIT_S = 30.0
PIPELINE = {"validate", "embed", "cache.lookup", "decode", "queue.wait", "backend", "cache.store"}


def _trace(spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    return [s for s in spans if format(s.context.trace_id, "032x") == TRACE_ID]


def _post(port: int, path: str, body: Any, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status


async def test_a_call_is_one_trace_continuing_the_callers(demo_model: ExportedModel) -> None:
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider("", "clip-gateway", exporter)
    settings = gateway_settings(demo_model.repository, local_cache_items=0)
    images = [encode(photo_like(64, 64, seed=40 + i), "PNG") for i in range(2)]
    async with running_gateway(settings, tracer_provider=provider) as gw, stub_for(gw.port) as stub:
        exporter.clear()  # the warm-up is not a call
        await stub.EmbedImage(
            clip_pb2.EmbedImageRequest(images=images), metadata=(("traceparent", TRACEPARENT),)
        )
        spans = _trace(exporter.get_finished_spans())
        by_name = {s.name: s for s in spans}
        server = by_name["clip.v1.ClipService/EmbedImage"]
        assert server.kind == SpanKind.SERVER and server.parent is not None
        assert format(server.parent.span_id, "016x") == CALLER_SPAN
        assert server.attributes["rpc.grpc.status_code"] == "OK"
        assert PIPELINE <= set(by_name), sorted(by_name)
        embed = by_name["embed"]
        assert embed.parent.span_id == server.context.span_id
        assert dict(embed.attributes) == {
            "clip.model": "clip",
            "clip.modality": "image",
            "clip.items": 2,
            "clip.lane": "interactive",
            "clip.cache.local_hits": 0,
        }
        assert by_name["cache.lookup"].attributes["clip.cache_hits"] == 0
        backend = by_name["backend"]
        assert backend.parent.span_id == embed.context.span_id
        assert backend.attributes["clip.batch_size"] == 2
        assert by_name["queue.wait"].end_time <= backend.start_time
        # The backend span links to the queue entries it served.
        assert {link.context.span_id for link in backend.links} == {
            s.context.span_id for s in spans if s.name == "queue.wait"
        }

        # A refused call: the server span carries the code; no span holds request content.
        exporter.clear()
        secret = "a caption nobody may see in a trace"
        with contextlib.suppress(Exception):
            await stub.EmbedText(
                clip_pb2.EmbedTextRequest(texts=[secret, "x" * 20_000]),
                metadata=(("traceparent", TRACEPARENT),),
            )
        spans = _trace(exporter.get_finished_spans())
        server = next(s for s in spans if s.name == "clip.v1.ClipService/EmbedText")
        assert server.attributes["rpc.grpc.status_code"] == "INVALID_ARGUMENT"
        assert server.status.status_code == StatusCode.ERROR
        for span in spans:
            for value in span.attributes.values():
                assert "caption" not in str(value)

        # HTTP: the same, from the `traceparent` header.
        exporter.clear()
        status = await asyncio.to_thread(
            _post,
            gw.http_port,
            "/v1/embeddings",
            {"model": "clip", "input": ["a red circle"]},
            {"traceparent": TRACEPARENT},
        )
        assert status == 200
        spans = _trace(exporter.get_finished_spans())
        by_name = {s.name: s for s in spans}
        http_span = by_name["POST /v1/embeddings"]
        assert format(http_span.parent.span_id, "016x") == CALLER_SPAN
        assert http_span.attributes["http.response.status_code"] == 200
        assert by_name["embed"].attributes["clip.modality"] == "text"
        assert {"tokenize", "queue.wait", "backend"} <= set(by_name)


async def test_without_an_endpoint_nothing_is_traced(demo_model: ExportedModel) -> None:
    settings = Settings.from_sources(environ={})
    assert settings.otlp_endpoint == ""
    from_standard = Settings.from_sources(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert from_standard.otlp_endpoint == "http://c:4317"
    async with running_gateway(gateway_settings(demo_model.repository)) as gw:
        assert gw.tracer_provider is None
        assert gw.embedder._tracer is NO_TRACER


def _triton_under_a_backend_span(spans: list[ReceivedSpan]) -> ReceivedSpan | None:
    """Triton's `InferRequest` span of the caller's trace whose parent is a gateway
    `backend` span of that trace (the `traceparent` the gateway sent), if received."""
    backends = {
        s.span_id
        for s in spans
        if s.service == "clip-gateway" and s.name == "backend" and s.trace_id == TRACE_ID
    }
    return next(
        (
            s
            for s in spans
            if s.service == "triton"
            and s.name == "InferRequest"
            and s.trace_id == TRACE_ID
            and s.parent_span_id in backends
        ),
        None,
    )


async def test_gateway_and_triton_export_over_otlp(
    demo_model: ExportedModel, tmp_path: Any
) -> None:
    """A real OTLP receiver on loopback gets the gateway's spans (OTLP/gRPC) and a real
    tritonserver's (OTLP/HTTP): one trace, the caller's, with Triton's request span under
    the gateway's `backend` span (the `traceparent` the gateway sends with the inference)."""
    with OtlpReceiver() as receiver:
        with start_triton(
            demo_model.repository,
            workdir=tmp_path,
            extra_args=opentelemetry_args(receiver.http_url),
        ) as triton:
            settings = gateway_settings(
                demo_model.repository,
                backend="triton",
                triton_url=triton.grpc_url,
                local_cache_items=0,
                otlp_endpoint=receiver.grpc_endpoint,
            )
            async with running_gateway(settings) as gw, stub_for(gw.port) as stub:
                image = encode(photo_like(64, 64, seed=77), "PNG")
                for attempt in range(1, OTLP_CALLS + 1):
                    await stub.EmbedImage(
                        clip_pb2.EmbedImageRequest(images=[image]),
                        metadata=(("traceparent", TRACEPARENT),),
                    )
                    # Both export in batches, every few seconds. A whole CI run once
                    # ended with this call's Triton spans missing (cause not found; not
                    # seen in dozens of runs since): another call of the same trace then.
                    try:
                        await asyncio.to_thread(
                            receiver.wait_for,
                            lambda got: _triton_under_a_backend_span(got) is not None,
                            OTLP_WAIT_S,
                        )
                        break
                    except AssertionError:
                        if attempt == OTLP_CALLS:
                            raise
            spans = receiver.snapshot()  # leaving the gateway flushed the rest of its spans
    gateway = [s for s in spans if s.service == "clip-gateway" and s.trace_id == TRACE_ID]
    names = {s.name for s in gateway}
    assert {"clip.v1.ClipService/EmbedImage", *PIPELINE} - {"cache.store"} <= names, names
    server = next(s for s in gateway if s.name == "clip.v1.ClipService/EmbedImage")
    assert server.parent_span_id == CALLER_SPAN and server.transport == "grpc"
    # Triton's request span hangs under the gateway's `backend` span of a call of this
    # trace, the model span under the request span, and Triton's compute under the model.
    request = _triton_under_a_backend_span(spans)
    assert request is not None and request.transport == "http"
    triton_spans = [s for s in spans if s.service == "triton" and s.trace_id == TRACE_ID]
    model_span = next(
        s for s in triton_spans if s.name == "clip_image" and s.parent_span_id == request.span_id
    )
    assert model_span.attributes["triton.model_name"] == "clip_image"
    assert any(s.name == "compute" and s.parent_span_id == model_span.span_id for s in triton_spans)
