"""OpenTelemetry traces: a tracer that exports over OTLP when an endpoint is set, else none.

With no endpoint (`--otlp-endpoint`, or the standard OTEL_EXPORTER_OTLP_ENDPOINT) no SDK
is loaded and nothing is installed: the transports add no interceptor or middleware, and
the pipeline gets OpenTelemetry's no-op tracer (its spans are one shared empty object).
With one, spans go through a batching processor to an OTLP/gRPC exporter, off the
request path.

Spans (the names operators see): one SERVER span per gRPC call (`clip.v1.ClipService/
EmbedImage`) or HTTP request (`POST /v1/embeddings`), continuing the caller's W3C
`traceparent`; under it `validate`, `embed` (model, modality, items, cache hits),
`cache.lookup` (the shared cache), `decode` / `tokenize`, `queue.wait` (per entry, in
the batching queue), `backend` (one per batch: batch size, lane; linked to every entry
it serves) and `cache.store`. The backend call carries the `backend` span as
`traceparent` to Triton. Attributes hold counts and names only: never inputs or keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

#: The instrumentation scope of every span the gateway makes.
SCOPE = "clip-service"
#: A tracer that records nothing: what every part gets when tracing is off.
NO_TRACER: trace.Tracer = trace.NoOpTracer()


def build_tracer_provider(
    endpoint: str,
    service_name: str,
    exporter: SpanExporter | None = None,
    sample_ratio: float = 1.0,
) -> TracerProvider:
    """An SDK provider exporting to `endpoint` over OTLP/gRPC (`http://` = plaintext), or to
    `exporter` when given (tests: an in-memory one, exported at once). `sample_ratio` of new
    traces are recorded; a caller's sampling decision (its traceparent) is followed."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    insecure = endpoint.startswith("http://")
    otlp = OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
    provider.add_span_processor(BatchSpanProcessor(otlp))
    return provider
