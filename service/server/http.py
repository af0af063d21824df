"""The HTTP API: OpenAI-compatible `/v1/embeddings` and JSON twins of the gRPC calls.

A Starlette app served by uvicorn inside the gateway's event loop (the one grpc.aio
runs on), over the same core calls as gRPC (`core/calls.py`: one place checks items,
sizes, the answer's size, bytes and deadlines for both doors), the same API keys
(`Authorization: Bearer KEY`, the same `ApiKeys`, so rotation applies), metrics
(`clip_requests_total{method="http:embeddings",...}`) and health. Errors come from the
one table in `status.py` and are answered in OpenAI's shape
`{"error": {"message", "type", "code"}}`, unknown routes (404) and methods (405) too.

A request here: headers within `--http-header-timeout-s` (else the connection is
closed); the body read within `--http-body-timeout-s` (else 408), by at most
`--max-http-body-reads` requests at once (else 429), its bytes held in the request byte
budget shared with gRPC as they arrive; only then a concurrency slot
(`--max-concurrent-rpcs`, else 429); the JSON decoded off the event loop, bounded
(`http_schema.py`); the core call; the answer encoded off the event loop.

Routes: `POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{model}`, `POST /v1/classify`,
`POST /v1/similarity` (open only with a key when keys are configured), and
`GET /health` (the process runs) and `GET /ready` (every model serves), always open.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import h11
import uvicorn
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.core import lanes, validation
from service.core.admission import ByteBudget
from service.core.calls import AnswerCosts, Calls
from service.core.image_fetch import FetchOptions, ImageFetcher
from service.core.models import ModelRegistry, ServedModel
from service.errors import (
    ClipError,
    InvalidInput,
    MethodNotAllowed,
    ModelNotFound,
    Overloaded,
    RequestTimeout,
    RequestTooLarge,
    RouteNotFound,
    Unauthenticated,
)
from service.metrics import Metrics
from service.server import http_schema as schema
from service.server.credentials import ApiKeys, TlsFiles, tls_server_context
from service.server.health import HealthMonitor
from service.server.http_catalog import CatalogRoutes
from service.server.servicer import model_info
from service.server.status import caller_message, http_retry_headers, outcome_for

#: `created` of every model in `/v1/models` (OpenAI's field; the export time is not kept).
_CREATED = 0
#: Threads decoding request JSON and encoding answers: also the bound on bodies decoded
#: at once, so the memory of decoding is that of two bodies at most.
_JSON_THREADS = 2
#: Image URLs of one request fetched at once (the rest wait their turn).
_FETCHES_AT_ONCE = 8
#: What JSON answers cost (rounded up). A float32 as JSON: up to 24 characters with its
#: comma ("-1.2345678901234567e-05,"); base64: 4 bytes → 16/3 characters; int8/uint8 up
#: to 5 ("-127,"); the bit formats one such integer per 8 dimensions.
HTTP_COSTS = AnswerCosts(
    per_vector=64,  # {"object":"embedding","index":N,"embedding":[...]}, + base64 padding
    per_value={
        "float": 24,
        "base64": 16 / 3,
        "int8": 5,
        "uint8": 4,
        "binary": 5 / 8,
        "ubinary": 4 / 8,
    },
    per_row=40,  # {"scores":[],"probabilities":[]}, / {"labels":[]},
    per_score=2 * 24,
    per_label=80,  # {"label":,"probability":,"score":}, and two floats
    label_bytes=schema.json_string_bytes,
)
_JSON = "application/json"


def _lane(call: _Call, priority: str | None) -> lanes.Lane:
    """The call's priority lane: the body's `priority`, else the `X-Clip-Priority` header,
    else interactive."""
    if priority is not None:
        return lanes.parse(priority)
    return lanes.parse(call.priority_header, field="X-Clip-Priority header")


@dataclass(frozen=True)
class HttpOptions:
    """What the HTTP API needs to know (see `Settings` for each field's meaning)."""

    max_body_bytes: int
    max_concurrent: int
    backend_timeout_s: float
    api_keys: ApiKeys
    body_timeout_s: float
    header_timeout_s: float
    max_body_reads: int
    #: Image URLs: fetched only from the hosts `allow` names.
    image_fetch: FetchOptions


def error_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-shaped body for `error` (the gRPC table's row)."""
    outcome = outcome_for(error)
    message = caller_message(error)
    body = {"error": {"message": message, "type": outcome.http_type, "code": outcome.code.name}}
    return outcome.http_status, body


def error_response(error: BaseException, *, close: bool = False) -> Response:
    """`error` answered in OpenAI's shape, with the headers its status calls for; `close`:
    the request's body was not read (all), so the connection cannot carry another."""
    status, body = error_body(error)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(error, MethodNotAllowed):
        headers["Allow"] = error.allow
    if close:
        headers["Connection"] = "close"
    headers.update(http_retry_headers(error))  # a load refusal: when to come back
    return Response(schema.encode_json(body), status_code=status, headers=headers, media_type=_JSON)


@dataclass
class _Call:
    """What a route learns about its call that the metrics want: the model it named
    (None until its body is parsed: such calls are labelled ''); and the path's
    parameters (`/v1/models/{model}`)."""

    model: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    #: `X-Clip-Priority`, the lane when the body names none.
    priority_header: str | None = None


#: A route: the request's JSON body (b"" for GET) → the answer, a JSON-ready value.
Handler = Callable[[bytes, _Call], Awaitable[Any]]


class HttpApi:
    """The routes, over the core calls; `app` is the ASGI application."""

    def __init__(
        self,
        models: ModelRegistry,
        health: HealthMonitor,
        metrics: Metrics,
        options: HttpOptions,
        request_bytes: ByteBudget,
        catalog: CatalogRoutes | None = None,
    ) -> None:
        self._models = models
        self._calls = Calls(
            models,
            max_answer_bytes=options.max_body_bytes,
            backend_timeout_s=options.backend_timeout_s,
            costs=HTTP_COSTS,
        )
        limits = models.default_embedder.limits
        self._bounds = schema.JsonBounds.for_limits(
            limits.max_items, limits.max_labels, limits.max_templates
        )
        self._request_bytes = request_bytes
        self._fetcher = ImageFetcher(options.image_fetch)
        self._health = health
        self._metrics = metrics
        self._options = options
        self._active = 0
        self._reading = 0
        self._json_pool = ThreadPoolExecutor(
            max_workers=_JSON_THREADS, thread_name_prefix="http-json"
        )
        self.app = Starlette(
            routes=[
                Route(
                    "/v1/embeddings", self._route("embeddings", self._embeddings), methods=["POST"]
                ),
                Route("/v1/models", self._route("models", self._list_models), methods=["GET"]),
                Route(
                    "/v1/models/{model:path}",
                    self._route("model", self._get_model),
                    methods=["GET"],
                ),
                Route("/v1/classify", self._route("classify", self._classify), methods=["POST"]),
                Route(
                    "/v1/similarity", self._route("similarity", self._similarity), methods=["POST"]
                ),
                *(catalog or CatalogRoutes(None, options.backend_timeout_s)).routes(
                    self._route, self._parse_struct, self._fetched
                ),
                Route("/health", self._health_route, methods=["GET"]),
                Route("/ready", self._ready_route, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._routing_error},
        )

    def close(self) -> None:
        """Stop the JSON threads (the server has stopped)."""
        self._json_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ plumbing
    def _route(self, name: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """`handler` with what every call gets: auth, the body read within its bounds, then
        the concurrency slot, metrics, and errors answered from the one table."""
        method = f"http:{name}"
        metrics = self._metrics

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            metrics.in_flight.labels(method).inc()
            code = "OK"
            call = _Call(
                params=dict(request.path_params),
                priority_header=request.headers.get("x-clip-priority"),
            )
            held = 0
            body_read = request.method != "POST"
            try:
                self._authenticate(request)
                raw = b""
                if not body_read:
                    raw, held = await self._read_body(request)
                    body_read = True
                # The slot only now: a caller still sending its body holds none.
                with self._slot():
                    answer = await handler(raw, call)
                    body = await self._off_loop(schema.encode_json, answer)
                return Response(body, media_type=_JSON)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                code = outcome_for(exc).code.name
                if isinstance(exc, Unauthenticated):
                    metrics.auth_failures.inc()
                return error_response(exc, close=not body_read)
            finally:
                if held:
                    self._request_bytes.give(held)
                label = "" if call.model is None else self._models.label(call.model)
                metrics.in_flight.labels(method).dec()
                metrics.request_latency.labels(method, label).observe(time.perf_counter() - started)
                metrics.requests.labels(method, code, label).inc()

        return endpoint

    async def _routing_error(self, request: Request, exc: Exception) -> Response:
        """Starlette's own 404 / 405 (no such route, wrong method) in OpenAI's shape."""
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            error: Exception = MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path[:200]}; use {allow}",
                allow,
            )
        elif exc.status_code == 404:
            error = RouteNotFound(
                f"no route {request.method} {request.url.path[:200]}; the API has POST "
                "/v1/embeddings, GET /v1/models, POST /v1/classify, POST /v1/similarity, "
                "GET /health and GET /ready"
            )
        else:
            error = InvalidInput(str(exc.detail))
        return error_response(error)

    async def _off_loop(self, work: Callable[..., Any], *args: Any) -> Any:
        """`work(*args)` on the JSON threads: the event loop answers others meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._json_pool, work, *args)

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        limit = self._options.max_concurrent
        if limit and self._active >= limit:
            raise Overloaded(
                f"server busy: {self._active} HTTP calls in progress, limit {limit} "
                "(--max-concurrent-rpcs); retry with backoff"
            )
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

    def _authenticate(self, request: Request) -> None:
        keys = self._options.api_keys
        if keys.enabled and not keys.accepts(request.headers.get("authorization")):
            raise Unauthenticated(
                "missing or invalid API key; send the header 'Authorization: Bearer <key>'"
            )

    async def _read_body(self, request: Request) -> tuple[bytes, int]:
        """The body and the request-budget bytes it holds (the caller gives them back).

        Refused with 413 as soon as it is known to pass `--max-message-bytes` (from its
        Content-Length before reading any of it, else while it streams in), with 408 when
        it is not all in within `--http-body-timeout-s`, with 429 when
        `--max-http-body-reads` bodies are being read already or its bytes do not fit in
        the request budget shared with gRPC (taken as they arrive, so a slow sender holds
        only what it sent).
        """
        options = self._options
        limit = options.max_body_bytes
        too_large = RequestTooLarge(
            f"the request body is over the limit of {limit} bytes (--max-message-bytes); "
            "split the request"
        )
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise too_large
            except ValueError:
                raise InvalidInput("the Content-Length header is not a number") from None
        if self._reading >= options.max_body_reads:
            raise Overloaded(
                f"server busy: {self._reading} request bodies being received, limit "
                f"{options.max_body_reads} (--max-http-body-reads); retry with backoff"
            )
        self._reading += 1
        chunks: list[bytes] = []
        held = 0
        try:
            async with asyncio.timeout(options.body_timeout_s):
                async for chunk in request.stream():
                    if held + len(chunk) > limit:
                        raise too_large
                    self._request_bytes.take(len(chunk))
                    held += len(chunk)
                    chunks.append(chunk)
        except TimeoutError:
            self._request_bytes.give(held)
            raise RequestTimeout(
                f"the request body did not arrive within {options.body_timeout_s:g} s "
                f"(--http-body-timeout-s; {held} bytes came); send it at once"
            ) from None
        except BaseException:
            self._request_bytes.give(held)
            raise
        finally:
            self._reading -= 1
        return b"".join(chunks), held

    @contextlib.asynccontextmanager
    async def _fetched(
        self,
        model: str,
        items: Sequence[Any],
        field: str,
        *,
        per_item: bool = False,
        indexed: bool = True,
    ) -> AsyncIterator[list[Any]]:
        """`items` with each `ImageUrl` replaced by the bytes fetched from it (or a 400),
        at most `_FETCHES_AT_ONCE` at a time; the fetched bytes are held in the request
        budget shared with gRPC until the block ends. `per_item` (the catalog's adds,
        answered one by one): a failed fetch leaves its error in the item's place instead
        of failing the request. `indexed`: errors name `field[i]`, else `field` alone."""
        urls = [i for i, item in enumerate(items) if isinstance(item, schema.ImageUrl)]
        if not urls:
            yield list(items)
            return
        # Count first: a request over --max-items fetches nothing.
        validation.check_count(len(items), field, self._models.get(model).embedder.limits.max_items)
        taken = 0
        turns = asyncio.Semaphore(_FETCHES_AT_ONCE)
        out = list(items)

        def take(n: int) -> None:
            nonlocal taken
            self._request_bytes.take(n)
            taken += n

        async def fetch(i: int) -> None:
            async with turns:
                try:
                    out[i] = await self._fetcher.fetch(
                        items[i].url,
                        take,
                        field=field,
                        index=i if indexed else None,
                        timeout_s=self._options.backend_timeout_s,
                    )
                except ClipError as exc:
                    if not per_item:
                        raise
                    out[i] = exc

        try:
            try:
                async with asyncio.TaskGroup() as group:
                    for i in urls:
                        group.create_task(fetch(i))
            except* Exception as failed:  # the first refusal answers; the others are cancelled
                raise failed.exceptions[0] from None
            yield out
        finally:
            self._request_bytes.give(taken)

    async def _parse_struct(self, raw: bytes, kind: type[Any]) -> Any:
        return await self._off_loop(schema.parse_struct, raw, kind, self._bounds)

    # ------------------------------------------------------------------ routes
    async def _embeddings(self, raw: bytes, call: _Call) -> Any:
        parsed = await self._off_loop(schema.parse_embeddings, raw, self._bounds)
        call.model = parsed.model
        model = self._models.get(parsed.model)
        dim = model.embedder.metadata.embedding_dim
        schema.check_dimensions(parsed.dimensions, dim, model.name)
        calls = self._calls
        async with self._fetched(parsed.model, parsed.items, "input") as items:
            with lanes.using(_lane(call, parsed.priority)):
                embedded = await calls.embed(
                    parsed.model,
                    items,
                    field="input",
                    encoding=parsed.encoding_format,
                    language=parsed.language,
                )
                tokens = await calls.token_counts(model, items, embedded.results, parsed.language)
        answer = {
            "object": "list",
            "data": [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": schema.encode_vector(r.vector, parsed.encoding_format),
                }
                for i, r in enumerate(embedded.results)
            ],
            "model": model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return answer

    def _describe(self, model: ServedModel) -> dict[str, Any]:
        return {
            "id": model.name,
            "object": "model",
            "created": _CREATED,
            "owned_by": "clipsvc",
            # Beyond OpenAI's fields: what GetModelInfo says, every field of it.
            **json_format.MessageToDict(
                model_info(model),
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            ),
            "default": model.name == self._models.default,
        }

    async def _list_models(self, raw: bytes, call: _Call) -> Any:
        return {"object": "list", "data": [self._describe(model) for model in self._models]}

    async def _get_model(self, raw: bytes, call: _Call) -> Any:
        """OpenAI's `GET /v1/models/{model}`: one model, 404 naming the served ones."""
        name = call.params.get("model", "")
        if not name:  # `/v1/models/` names no model (`get('')` would be the default)
            raise ModelNotFound(name, self._models.names)
        model = self._models.get(name)
        call.model = model.name
        return self._describe(model)

    async def _classify(self, raw: bytes, call: _Call) -> Any:
        parsed = await self._off_loop(schema.parse_classify, raw, self._bounds)
        call.model = parsed.model
        async with self._fetched(parsed.model, parsed.images, "images") as images:
            with lanes.using(_lane(call, parsed.priority)):
                classified = await self._calls.classify(
                    parsed.model,
                    images,
                    parsed.labels,
                    parsed.templates,
                    parsed.top_k,
                    language=parsed.language,
                )
        answer = {
            "results": [
                {
                    "labels": [
                        {"label": r.label, "probability": r.probability, "score": r.score}
                        for r in ranked
                    ]
                }
                for ranked in classified.ranked
            ],
            "model": classified.model.name,
        }
        return answer

    async def _similarity(self, raw: bytes, call: _Call) -> Any:
        parsed = await self._off_loop(schema.parse_similarity, raw, self._bounds)
        call.model = parsed.model
        async with (
            self._fetched(parsed.model, parsed.queries, "queries") as queries,
            self._fetched(parsed.model, parsed.candidates, "candidates") as candidates,
        ):
            with lanes.using(_lane(call, parsed.priority)):
                compared = await self._calls.similarity(
                    parsed.model, queries, candidates, language=parsed.language
                )
        result = compared.result
        rows = [
            {"scores": scores, "probabilities": probabilities}
            for scores, probabilities in zip(result.scores, result.probabilities, strict=True)
        ]
        return {"rows": rows, "model": compared.model.name}

    async def _health_route(self, request: Request) -> Response:
        """Liveness: 200 while the process runs (like the gRPC `liveness` service)."""
        return Response(schema.encode_json({"status": "alive"}), media_type=_JSON)

    async def _ready_route(self, request: Request) -> Response:
        """Readiness: 200 when every model serves, else 503; per model in `models`."""
        serving = self._health.serving
        body = {
            "status": "ready" if serving else "not ready",
            "models": dict(self._health.models_serving),
        }
        return Response(
            schema.encode_json(body), status_code=200 if serving else 503, media_type=_JSON
        )


#: How long a connection refused mid-body keeps reading (and dropping) what its caller
#: still sends before it is closed; nginx's `lingering_time` idea, shorter.
LINGER_S = 5.0


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: `close()` while the caller is still
    sending its body (a 413, a 408, a refusal before the body was read) first half-closes
    and drops what still arrives, up to `LINGER_S` or the caller's EOF. Closed at once, the
    kernel answers the unread bytes with a reset, and the caller loses the error answer
    that was already on its way (seen with a chunked body past --max-message-bytes)."""

    def __init__(self, transport: asyncio.Transport, protocol: _ConnectionProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        if not self._protocol.linger():
            self._transport.close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _ConnectionProtocol(H11Protocol):
    """uvicorn's h11 protocol with what a connection needs beyond it: a deadline for a
    request's headers (set by `_connection_protocol`) and a lingering close."""

    head_timeout_s: float = 10.0
    lingering: bool = False
    _head_timer: asyncio.TimerHandle | None = None
    _linger_timer: asyncio.TimerHandle | None = None
    _raw: asyncio.Transport

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._raw = transport
        # Request cycles are given `self.transport`: they close through the proxy too.
        self.transport = _LingeringTransport(transport, self)  # type: ignore[assignment]
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # the rest of a refused body: dropped unread
        if self._head_timer is None and self._between_requests():
            self._arm()
        super().data_received(data)
        if self._head_timer is not None and not self._between_requests():
            self._disarm()  # the head is in: the body has its own deadline

    def eof_received(self) -> bool | None:
        if self.lingering:
            self._raw.close()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def linger(self) -> bool:
        """Start the lingering close if the caller is still sending a body (and the
        transport can half-close: not TLS); False to close at once."""
        if self.lingering:
            return True
        sending = self.conn.their_state is h11.SEND_BODY
        if not sending or self._raw.is_closing() or not self._raw.can_write_eof():
            return False
        self.lingering = True
        self._raw.resume_reading()  # flow control may have paused it mid-body
        self._raw.write_eof()  # after what is buffered: the answer goes out first
        self._linger_timer = self.loop.call_later(LINGER_S, self._raw.close)
        return True

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if self._between_requests() and self.conn.their_state is not h11.DONE:
            self.transport.close()


def _connection_protocol(head_timeout_s: float) -> type[_ConnectionProtocol]:
    """`_ConnectionProtocol` whose connections close when a request's headers are not all
    in `head_timeout_s` after it opened, or after the next request began (uvicorn itself
    times out only idle keep-alive connections)."""
    return type("ConnectionProtocol", (_ConnectionProtocol,), {"head_timeout_s": head_timeout_s})


class _InLoopServer(uvicorn.Server):
    """uvicorn without its signal handlers: the gateway owns SIGTERM (graceful stop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """uvicorn serving `app` on a socket bound now (port 0 = a free one), as a task of
    the running event loop; HTTPS with `tls` (the gRPC port's files, client certificates
    required with its `client_ca`), re-read when they change, as on the gRPC port."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        tls: TlsFiles | None = None,
        *,
        header_timeout_s: float = 10.0,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise OSError(f"could not bind HTTP {host}:{port}: {exc}") from exc
        self._socket.listen(2048)
        self._socket.setblocking(False)
        self.port: int = self._socket.getsockname()[1]
        tls_options: dict[str, Any] = {}
        if tls is not None:
            context = tls_server_context(tls)
            tls_options = {"ssl_context_factory": lambda _config, _default: context}
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=None,
            http=_connection_protocol(header_timeout_s),
            **tls_options,
        )
        self._on_close = on_close
        self._server = _InLoopServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve in the background; returns once the socket accepts connections."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="http")
        while not self._server.started:
            if self._task.done():
                await self._task  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, give open requests up to `grace_s`, then close."""
        if self._task is None:
            self._socket.close()
            if self._on_close is not None:
                self._on_close()
            return
        self._server.config.timeout_graceful_shutdown = max(1, round(grace_s))
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s + 5.0)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        finally:
            self._socket.close()
            self._task = None
            if self._on_close is not None:
                self._on_close()
