"""A tiny OTLP trace receiver on loopback: gRPC (what the gateway's exporter speaks) and
HTTP/protobuf (what Triton's OpenTelemetry tracer speaks), built from the collector's own
protobuf definitions (`opentelemetry-proto`). Spans received are kept, flattened.

    with OtlpReceiver() as receiver:
        ... --otlp-endpoint receiver.grpc_endpoint / Triton url=receiver.http_url ...
        spans = receiver.wait_for(lambda spans: len(spans) >= 3)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver got it (ids as lower-case hex, as in `traceparent`)."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any] = field(default_factory=dict)
    transport: str = "grpc"


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpReceiver:
    """Collects spans sent over OTLP/gRPC (`grpc_endpoint`) and OTLP/HTTP (`http_url`)."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        receiver = self

        class _Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._keep(request, "grpc")
                return trace_service_pb2.ExportTraceServiceResponse()

        class _Http(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if "json" in self.headers.get("content-type", ""):
                    # Triton's C++ exporter sends OTLP/JSON (ids as hex, as OTLP says).
                    receiver._keep_json(json.loads(body))
                    answer, kind = b"{}", "application/json"
                else:
                    request = trace_service_pb2.ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    receiver._keep(request, "http")
                    response = trace_service_pb2.ExportTraceServiceResponse()
                    answer, kind = response.SerializeToString(), "application/x-protobuf"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _Http)
        self.http_port = self._http.server_address[1]
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def grpc_endpoint(self) -> str:
        """For OTLP/gRPC exporters (`--otlp-endpoint`, OTEL_EXPORTER_OTLP_ENDPOINT)."""
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """For OTLP/HTTP exporters: the traces path included."""
        return f"http://127.0.0.1:{self.http_port}/v1/traces"

    def __enter__(self) -> OtlpReceiver:
        self._grpc.start()
        self._http_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._grpc.stop(0)
        self._http.shutdown()
        self._http.server_close()

    def _keep(self, request: Any, transport: str) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            transport=transport,
                        )
                    )
        with self._lock:
            self.spans.extend(spans)

    def _keep_json(self, request: dict[str, Any]) -> None:
        def values(attributes: list[dict[str, Any]]) -> dict[str, Any]:
            return {a["key"]: next(iter(a.get("value", {}).values()), None) for a in attributes}

        spans = []
        for resource_spans in request.get("resourceSpans", []):
            resource = values(resource_spans.get("resource", {}).get("attributes", []))
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    spans.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=span.get("name", ""),
                            trace_id=span.get("traceId", "").lower(),
                            span_id=span.get("spanId", "").lower(),
                            parent_span_id=span.get("parentSpanId", "").lower(),
                            attributes=values(span.get("attributes", [])),
                            transport="http",
                        )
                    )
        with self._lock:
            self.spans.extend(spans)

    def snapshot(self) -> list[ReceivedSpan]:
        """The spans received so far."""
        with self._lock:
            return list(self.spans)

    def wait_for(
        self, done: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 60.0
    ) -> list[ReceivedSpan]:
        """Block until `done(spans)` (exporters send in batches, every few seconds)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.snapshot()
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({(s.service, s.name, s.trace_id[:8]) for s in spans})
                raise AssertionError(f"OTLP receiver: not done within {timeout_s} s; got {names}")
            time.sleep(0.1)  # poll interval of a list filled by other threads
