"""Cross-cutting concerns, once for every RPC: metrics, error → status, API keys, bytes held.

Handlers raise `service.errors` types and never catch them; `ObservabilityInterceptor`
turns them into status codes (the table in `status.py`), logs unexpected errors with
their traceback as INTERNAL, and counts every call by method and code.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from service.core.admission import ByteBudget
from service.errors import InvalidInput
from service.metrics import Metrics
from service.server.credentials import ApiKeys
from service.server.status import caller_message, grpc_retry_metadata, status_for

# Probes and tooling stay open when API keys are configured.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

#: A cancellation this close to the call's deadline is counted as DEADLINE_EXCEEDED.
_DEADLINE_SLACK_S = 0.25

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def _method_name(details: grpc.HandlerCallDetails) -> str:
    return details.method.rsplit("/", 1)[-1] or details.method


async def _abort_for(error: BaseException, context: grpc.aio.ServicerContext) -> None:
    # A load refusal carries when to come back (`grpc-retry-pushback-ms`).
    await context.abort(
        status_for(error), caller_message(error), trailing_metadata=grpc_retry_metadata(error)
    )


class Undecodable:
    """A request message protobuf could not parse (a string that is not UTF-8, broken
    framing). grpc would answer UNKNOWN from its deserializer; this marker reaches the
    call instead, which refuses it with INVALID_ARGUMENT like any bad input."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def refusal(self) -> InvalidInput:
        """The caller's error: what protobuf said, and the likely cause."""
        return InvalidInput(
            f"the request is not a valid protobuf message ({self.reason}); every string "
            "field must be UTF-8 text (a lone surrogate is not)"
        )


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserialize`, answering `Undecodable` instead of raising on a malformed message."""
    if deserialize is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as exc:
            return Undecodable(str(exc))

    return decode


def _wrap(
    handler: grpc.RpcMethodHandler,
    around: Callable[[Callable[..., Any], bool], Callable[..., Any]],
    deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """Rebuild `handler` with its behaviour wrapped, whatever its streaming kind (and its
    request deserializer replaced by `deserializer` when given)."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
    )
    for attr, factory, streams_out in kinds:
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            return factory(
                around(behaviour, streams_out),
                request_deserializer=deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _wrap_calls(
    handler: grpc.RpcMethodHandler,
    scope: Callable[[Any, grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager[Any]],
    deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """Rebuild `handler` so that each call runs inside `scope(request, context)`."""

    def around(behaviour: Callable[..., Any], streams_out: bool) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(request, context):
                return await behaviour(request, context)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with scope(request, context):
                async for response in behaviour(request, context):
                    yield response

        # A streaming handler is either an async generator or a coroutine that writes
        # with `context.write` (grpc.health.v1's Watch): wrap each as what it is.
        return stream if streams_out and not inspect.iscoroutinefunction(behaviour) else unary

    return _wrap(handler, around, deserializer)


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Counts requests by method, code and model, times them, and maps errors to status codes."""

    def __init__(self, metrics: Metrics, model_label: Callable[[str], str] = str) -> None:
        """`model_label`: a request's `model` field → its bounded metric label (streams,
        whose messages may each name a model, and calls without one are labelled '')."""
        self._metrics = metrics
        self._model_label = model_label

    @contextlib.asynccontextmanager
    async def _observed(
        self, method: str, context: grpc.aio.ServicerContext, model: str = ""
    ) -> AsyncIterator[None]:
        metrics = self._metrics
        started = time.perf_counter()
        metrics.in_flight.labels(method).inc()
        code = "OK"
        try:
            yield
        except asyncio.CancelledError:
            # grpc cancels the handler both when the caller gives up and when its deadline
            # passes (no status is set then); the time left tells the two apart. The
            # caller's own deadline timer usually fires first and cancels the stream, a
            # little before the server's copy of the deadline (which started later, on
            # arrival): a cancel that close to the deadline is the deadline.
            remaining = context.time_remaining()
            deadline = remaining is not None and remaining <= _DEADLINE_SLACK_S
            code = "DEADLINE_EXCEEDED" if deadline else "CANCELLED"
            raise
        except Exception as exc:
            if context.code() is None:  # not aborted on purpose by the handler
                code = status_for(exc).name
                await _abort_for(exc, context)
            raise
        finally:
            set_code = context.code()
            if isinstance(set_code, grpc.StatusCode):
                code = set_code.name
            metrics.in_flight.labels(method).dec()
            metrics.request_latency.labels(method, model).observe(time.perf_counter() - started)
            metrics.requests.labels(method, code, model).inc()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = _method_name(handler_call_details)
        observed = self._observed
        model_label = self._model_label

        @contextlib.asynccontextmanager
        async def scope(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            # Streamed requests (an iterator) and calls without a `model` are labelled ''.
            model = getattr(request, "model", None)
            label = model_label(model) if isinstance(model, str) else ""
            async with observed(method, context, label):
                if isinstance(request, Undecodable):
                    raise request.refusal()
                yield

        return _wrap_calls(handler, scope, _tolerant(handler.request_deserializer))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <key>` on every RPC except health and reflection."""

    def __init__(self, keys: ApiKeys, metrics: Metrics) -> None:
        self._keys = keys
        self._metrics = metrics

    def _allowed(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
        for name, value in metadata or ():
            if name.lower() == "authorization":
                return self._keys.accepts(value)
        return self._keys.accepts(None)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method.startswith(_OPEN_PREFIXES) or self._allowed(
            handler_call_details.invocation_metadata
        ):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        metrics = self._metrics

        def around(behaviour: Callable[..., Any], streams_out: bool) -> Callable[..., Any]:
            async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
                metrics.auth_failures.inc()
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or invalid API key; send metadata 'authorization: Bearer <key>'",
                )

            if streams_out:

                async def deny_stream(
                    request: Any, context: grpc.aio.ServicerContext
                ) -> AsyncIterator[Any]:
                    await deny(request, context)
                    yield  # pragma: no cover - abort raised above

                return deny_stream
            return deny

        return _wrap(handler, around)


class RequestBytesInterceptor(grpc.aio.ServerInterceptor):
    """Holds each unary request's size in a `ByteBudget` while its call runs.

    gRPC has received the whole message before any handler runs, so this cannot stop one
    from arriving (max_concurrent_rpcs × max_message_bytes bounds that); it bounds the
    bytes kept during the long part of a call (decode, queue, backend): past the budget a
    call is refused at once with RESOURCE_EXHAUSTED and its message is dropped. Streams
    are bounded per message by their window instead.
    """

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        budget = self._budget

        @contextlib.asynccontextmanager
        async def scope(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            size = _RECEIVED_BYTES.get()
            with budget.held(request.ByteSize() if size is None else size):
                yield

        return _wrap_calls(handler, scope, _measured(handler.request_deserializer))


#: The size of the request message this call's task received, set by the deserializer
#: `RequestBytesInterceptor` installs: upb's `ByteSize()` encodes the whole message again
#: (a copy of every image in it: ~10% of the gateway's CPU on pre-sized pixels). grpc.aio
#: deserializes in the task that then runs the handler; where a call's task saw no
#: deserialization (None), `ByteSize()` answers instead.
_RECEIVED_BYTES: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "received_bytes", default=None
)


def _measured(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserialize`, noting the message's size on the wire for this call's task."""
    if deserialize is None:
        return None

    def decode(raw: bytes) -> Any:
        _RECEIVED_BYTES.set(len(raw))
        return deserialize(raw)

    return decode
