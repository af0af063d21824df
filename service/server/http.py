"""The HTTP API: OpenAI-compatible `/v1/embeddings` and JSON twins of the gRPC calls.

A Starlette app served by uvicorn inside the gateway's event loop (the one grpc.aio
runs on), over the same `ModelRegistry`: the same pipelines, admission bound, cache,
API keys (`Authorization: Bearer KEY`, the same `ApiKeys`, so rotation applies), metrics
(`clip_requests_total{method="http:embeddings",...}`) and health. Errors come from the
one table in `status.py` and are answered in OpenAI's shape
`{"error": {"message", "type", "code"}}`.

Routes: `POST /v1/embeddings`, `GET /v1/models`, `POST /v1/classify`,
`POST /v1/similarity` (open only with a key when keys are configured), and
`GET /health` (the process runs) and `GET /ready` (every model serves), always open.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.core import lanes, validation
from service.core.admission import ByteBudget
from service.core.embedder import Embedder
from service.core.models import ModelRegistry
from service.errors import InvalidInput, Overloaded, RequestTooLarge, Unauthenticated
from service.metrics import Metrics
from service.server import http_schema as schema
from service.server.credentials import ApiKeys, TlsFiles, tls_server_context
from service.server.health import HealthMonitor
from service.server.http_catalog import CatalogRoutes
from service.server.servicer import model_info
from service.server.status import caller_message, http_retry_headers, outcome_for

#: `created` of every model in `/v1/models` (OpenAI's field; the export time is not kept).
_CREATED = 0
#: Texts whose token count each model remembers.
_TOKEN_COUNTS = 4096


def _token_counter(embedder: Embedder) -> Callable[[str], int]:
    """Tokens `embedder` reads of a text: start and end included, cut at its context."""

    def count(text: str) -> int:
        return len(embedder.tokenizer.tokenize(text).ids)

    return count


def _lane(request: Request, body: dict[str, Any]) -> lanes.Lane:
    """The call's priority lane: the body's `priority`, else the `X-Clip-Priority` header,
    else interactive."""
    if "priority" in body:
        return lanes.parse(body["priority"])
    return lanes.parse(request.headers.get("x-clip-priority"), field="X-Clip-Priority header")


@dataclass(frozen=True)
class HttpOptions:
    """What the HTTP API needs to know (see `Settings` for each field's meaning)."""

    max_body_bytes: int
    max_concurrent: int
    backend_timeout_s: float
    api_keys: ApiKeys


def error_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-shaped body for `error` (the gRPC table's row)."""
    outcome = outcome_for(error)
    message = caller_message(error)
    body = {"error": {"message": message, "type": outcome.http_type, "code": outcome.code.name}}
    return outcome.http_status, body


class HttpApi:
    """The routes, over a registry; `app` is the ASGI application."""

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
        self._request_bytes = request_bytes
        self._health = health
        self._metrics = metrics
        self._options = options
        self._active = 0
        # Tokens each text is read as (OpenAI's `usage`), remembered: repeated texts, the
        # ones the cache answers, would otherwise be tokenized again only to be counted.
        self._token_counts = {
            m.name: functools.lru_cache(maxsize=_TOKEN_COUNTS)(_token_counter(m.embedder))
            for m in models
        }
        self.app = Starlette(
            routes=[
                Route(
                    "/v1/embeddings", self._route("embeddings", self._embeddings), methods=["POST"]
                ),
                Route("/v1/models", self._route("models", self._list_models), methods=["GET"]),
                Route("/v1/classify", self._route("classify", self._classify), methods=["POST"]),
                Route(
                    "/v1/similarity", self._route("similarity", self._similarity), methods=["POST"]
                ),
                *(catalog or CatalogRoutes(None, options.backend_timeout_s)).routes(self._route),
                Route("/health", self._health_route, methods=["GET"]),
                Route("/ready", self._ready_route, methods=["GET"]),
            ],
        )

    # ------------------------------------------------------------------ plumbing
    def _route(
        self, name: str, handler: Callable[[Request, dict[str, Any]], Awaitable[dict[str, Any]]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """`handler` with what every call gets: auth, the body read within its bound, the
        concurrency bound, metrics, and errors answered from the one table."""
        method = f"http:{name}"
        metrics = self._metrics

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            metrics.in_flight.labels(method).inc()
            code, label = "OK", ""
            try:
                with self._slot():
                    self._authenticate(request)
                    body: dict[str, Any] = {}
                    raw = b""
                    if request.method == "POST":
                        raw = await self._read_body(request)
                        body = schema.parse_json(raw)
                        named = body.get("model") or ""
                        label = self._models.label(named) if isinstance(named, str) else ""
                    # The same budget as gRPC requests: bytes kept while the call runs.
                    with self._request_bytes.held(len(raw)), lanes.using(_lane(request, body)):
                        answer = await handler(request, body)
                return JSONResponse(answer)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                code = outcome_for(exc).code.name
                if isinstance(exc, Unauthenticated):
                    metrics.auth_failures.inc()
                status, error = error_body(exc)
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
                headers.update(http_retry_headers(exc))  # a load refusal: when to come back
                return JSONResponse(error, status_code=status, headers=headers)
            finally:
                metrics.in_flight.labels(method).dec()
                metrics.request_latency.labels(method, label).observe(time.perf_counter() - started)
                metrics.requests.labels(method, code, label).inc()

        return endpoint

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

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it is known to pass the bound: from its
        Content-Length before reading any of it, else while it streams in."""
        limit = self._options.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = RequestTooLarge(
            f"the request body is over the limit of {limit} bytes (--max-message-bytes); "
            "split the request"
        )
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise too_large
            except ValueError:
                raise InvalidInput("the Content-Length header is not a number") from None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------------ routes
    async def _embeddings(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        parsed = schema.parse_embeddings(body)
        model = self._models.get(parsed.model)
        embedder = model.embedder
        schema.check_dimensions(parsed.dimensions, embedder.metadata.embedding_dim, model.name)
        validation.check_count(len(parsed.items), "input", embedder.limits.max_items)
        timeout_s = self._options.backend_timeout_s
        texts = [item for item in parsed.items if isinstance(item, str)]
        if len(texts) == len(parsed.items):  # texts only: straight to the text pipeline
            embedded = await embedder.embed_texts(
                texts, timeout_s=timeout_s, field="input", language=parsed.language
            )
            vectors = [e.vector for e in embedded]
        else:
            vectors = list(
                await model.scorer.embed_items(parsed.items, "input", timeout_s, parsed.language)
            )
        count = self._token_counts[model.name]
        tokens = sum(count(text) for text in texts)
        return {
            "object": "list",
            "data": [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": schema.encode_vector(v, parsed.encoding_format),
                }
                for i, v in enumerate(vectors)
            ],
            "model": model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def _list_models(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        data = [
            {
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
            for model in self._models
        ]
        return {"object": "list", "data": data}

    async def _classify(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        parsed = schema.parse_classify(body)
        model = self._models.get(parsed.model)
        results = await model.scorer.classify(
            parsed.images,
            parsed.labels,
            parsed.templates,
            parsed.top_k,
            timeout_s=self._options.backend_timeout_s,
            language=parsed.language,
        )
        return {
            "results": [
                {
                    "labels": [
                        {"label": r.label, "probability": r.probability, "score": r.score}
                        for r in ranked
                    ]
                }
                for ranked in results
            ],
            "model": model.embedder.model_id,
        }

    async def _similarity(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        parsed = schema.parse_similarity(body)
        model = self._models.get(parsed.model)
        result = await model.scorer.similarity(
            parsed.queries,
            parsed.candidates,
            timeout_s=self._options.backend_timeout_s,
            language=parsed.language,
        )
        rows = [
            {"scores": scores.tolist(), "probabilities": probabilities.tolist()}
            for scores, probabilities in zip(result.scores, result.probabilities, strict=True)
        ]
        return {"rows": rows, "model": model.embedder.model_id}

    async def _health_route(self, request: Request) -> Response:
        """Liveness: 200 while the process runs (like the gRPC `liveness` service)."""
        return JSONResponse({"status": "alive"})

    async def _ready_route(self, request: Request) -> Response:
        """Readiness: 200 when every model serves, else 503; per model in `models`."""
        serving = self._health.serving
        body = {
            "status": "ready" if serving else "not ready",
            "models": dict(self._health.models_serving),
        }
        return JSONResponse(body, status_code=200 if serving else 503)


class _InLoopServer(uvicorn.Server):
    """uvicorn without its signal handlers: the gateway owns SIGTERM (graceful stop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """uvicorn serving `app` on a socket bound now (port 0 = a free one), as a task of
    the running event loop; HTTPS with `tls` (the gRPC port's files, client certificates
    required with its `client_ca`), re-read when they change, as on the gRPC port."""

    def __init__(self, app: Any, host: str, port: int, tls: TlsFiles | None = None) -> None:
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
            **tls_options,
        )
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
