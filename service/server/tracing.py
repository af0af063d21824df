"""A SERVER span per gRPC call and per HTTP request, continuing the caller's trace.

Installed only when tracing is on (`service.telemetry`). The caller's W3C `traceparent`
(gRPC metadata, HTTP header) is the parent; the pipeline's spans (`validate`, `decode`,
`queue.wait`, `backend`, ...) are its children, through OpenTelemetry's context (a
context variable, as the call's lane is). Health, reflection and the HTTP probes are
not traced: they would drown the traces that matter.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from service.server.interceptors import Continuation, _wrap_calls

_UNTRACED_GRPC = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_UNTRACED_HTTP = ("/health", "/ready")
#: HTTP routes named in span names; any other path is named by its method only (a span
#: name must come from a small set, not from what a caller typed).
_HTTP_ROUTES = ("/v1/embeddings", "/v1/models", "/v1/classify", "/v1/similarity")

Scope = MutableMapping[str, Any]
Asgi = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Any]


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Outermost interceptor: the call's SERVER span, its status from the call's code."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None or full.startswith(_UNTRACED_GRPC):
            return handler
        carrier = {
            key: value
            for key, value in handler_call_details.invocation_metadata or ()
            if isinstance(value, str)
        }
        parent = propagate.extract(carrier)
        service, _, method = full.lstrip("/").rpartition("/")
        tracer = self._tracer

        @contextlib.asynccontextmanager
        async def scope(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            attributes: dict[str, str] = {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": method,
            }
            model = getattr(request, "model", None)
            if isinstance(model, str) and model:
                attributes["clip.requested_model"] = model[:64]
            with tracer.start_as_current_span(
                full.lstrip("/"),
                context=parent,
                kind=SpanKind.SERVER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                code = "OK"
                try:
                    yield
                except BaseException as exc:
                    code = "CANCELLED" if not isinstance(exc, Exception) else "UNKNOWN"
                    raise
                finally:
                    # The observability interceptor (inside) has set the code by now.
                    if isinstance(context.code(), grpc.StatusCode):
                        code = context.code().name
                    span.set_attribute("rpc.grpc.status_code", code)
                    if code != "OK":
                        span.set_status(Status(StatusCode.ERROR, code))

        return _wrap_calls(handler, scope)


def traced_asgi(app: Asgi, tracer: trace.Tracer) -> Asgi:
    """`app` with a SERVER span around each HTTP request but the probes."""

    async def traced(scope: Scope, receive: Any, send: Any) -> Any:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in _UNTRACED_HTTP:
            return await app(scope, receive, send)
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        method = scope.get("method", "GET")
        route = path if path in _HTTP_ROUTES else ""
        status: list[int] = []

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        with tracer.start_as_current_span(
            f"{method} {route}".strip(),
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        ) as span:
            result = await app(scope, receive, send_status)
            if status:
                span.set_attribute("http.response.status_code", status[0])
                if status[0] >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            return result

    return traced
