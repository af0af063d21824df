"""The transport: a grpc.aio server with the servicer, health, reflection and metrics,
and the HTTP API (`http.py`) in the same event loop.

Takes plain values (`ServerOptions`) and a built pipeline; `service.wiring` makes both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from prometheus_client import start_http_server

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.core.admission import ByteBudget
from service.core.calls import Calls
from service.core.catalog import Catalog
from service.core.embedder import Embedder
from service.core.image_fetch import FetchOptions
from service.core.models import ModelRegistry
from service.metrics import Metrics
from service.server import reflection
from service.server.credentials import ApiKeys, TlsFiles, tls_server_credentials
from service.server.health import HealthMonitor
from service.server.http import HttpApi, HttpOptions, HttpServer
from service.server.http_catalog import CatalogRoutes
from service.server.interceptors import (
    ApiKeyInterceptor,
    ObservabilityInterceptor,
    RequestBytesInterceptor,
)
from service.server.servicer import PROTO_COSTS, ClipServicer
from service.server.tracing import TracingInterceptor, traced_asgi

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerOptions:
    """What the transport needs to know (see `Settings` for each field's meaning)."""

    host: str
    port: int
    metrics_port: int
    max_message_bytes: int
    max_concurrent_rpcs: int
    max_inflight_request_bytes: int
    health_port: int
    http_port: int
    shutdown_grace_s: float
    backend_timeout_s: float
    api_keys: ApiKeys
    tls: TlsFiles | None
    http_header_timeout_s: float = 10.0
    http_body_timeout_s: float = 30.0
    max_http_body_reads: int = 64
    image_url_allow: tuple[str, ...] = ()
    image_url_timeout_s: float = 10.0
    max_image_bytes: int = 20 * 1024 * 1024


@dataclass
class Gateway:
    """A running (or ready to run) gateway and the parts tests may look at."""

    options: ServerOptions
    server: grpc.aio.Server
    port: int
    models: ModelRegistry
    health: HealthMonitor
    metrics: Metrics
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    metrics_port: int | None = None
    http_server: HttpServer | None = None
    #: The catalog (`--catalog`), opened by `start()`, closed by `stop()`.
    catalog: Catalog | None = None
    #: Run last by `stop()` (wiring's parts the transport does not know, e.g. an engine).
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    #: The OpenTelemetry SDK provider when tracing is on: flushed and closed at stop.
    tracer_provider: Any = None
    _metrics_http: Any = field(default=None, repr=False)

    @property
    def embedder(self) -> Embedder:
        """The default model's pipeline."""
        return self.models.default_embedder

    @property
    def http_port(self) -> int | None:
        """The HTTP API's port (None when disabled)."""
        return self.http_server.port if self.http_server is not None else None

    async def start(self) -> None:
        """Start the backends, the servers and the health monitor (NOT_SERVING until warm)."""
        await self.models.start()
        if self.catalog is not None:
            await self.catalog.open()  # before any port opens: a bad catalog stops the start
            _LOGGER.info("catalog open (index %s)", self.catalog.index_description)
        # NOT_SERVING before any port opens: grpc's health servicer answers SERVING for ""
        # until told otherwise, and the ports below take event-loop turns to start.
        await self.health.start()
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.http_server is not None:
            await self.http_server.start()
        if self.options.metrics_port >= 0:
            http, _thread = start_http_server(
                self.options.metrics_port, addr=self.options.host, registry=self.metrics.registry
            )
            self._metrics_http = http
            self.metrics_port = http.server_port
        _LOGGER.info(
            "listening on %s:%d (HTTP on %s, metrics on %s), models %s (default %s), backend %s",
            self.options.host,
            self.port,
            self.http_port,
            self.metrics_port,
            ", ".join(f"{m.name}={m.embedder.model_id}" for m in self.models),
            self.models.default,
            self.embedder.backend_name,
        )

    async def wait_until_serving(self, timeout_s: float = 120.0) -> None:
        """Block until health is SERVING (tests, CLI)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.health.serving:
            if loop.time() > deadline:
                raise TimeoutError("gateway did not become healthy in time")
            await asyncio.sleep(0.05)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful: NOT_SERVING, let in-flight calls finish (up to grace), then release."""
        grace = self.options.shutdown_grace_s if grace_s is None else grace_s
        await self.health.shutdown()
        if self.health_server is not None:
            await self.health_server.stop(0)  # probes see the port close: not ready
        stopping = [self.server.stop(grace)]
        if self.http_server is not None:
            stopping.append(self.http_server.stop(grace))
        await asyncio.gather(*stopping)
        await self.models.aclose()
        if self.catalog is not None:
            await self.catalog.aclose()
        if self.tracer_provider is not None:
            # Spans of the last calls still wait in the batching processor: send them.
            await asyncio.to_thread(self.tracer_provider.shutdown)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        for stop in self.on_stop:
            stop()


def build_server(
    options: ServerOptions,
    models: ModelRegistry,
    metrics: Metrics,
    catalog: Catalog | None = None,
    tracer: trace.Tracer | None = None,
) -> Gateway:
    """The grpc.aio server (and the HTTP API) around built pipelines, bound but not
    started; `catalog` (not yet opened) answers the catalog calls; `tracer`: a SERVER span
    per call (None: tracing off, nothing installed)."""
    interceptors: list[grpc.aio.ServerInterceptor] = [
        ObservabilityInterceptor(metrics, models.label)
    ]
    if tracer is not None:
        interceptors.insert(0, TracingInterceptor(tracer))  # outermost: sees the final code
    if options.api_keys.enabled:
        interceptors.append(ApiKeyInterceptor(options.api_keys, metrics))
    # Innermost: only calls that passed the API-key check hold request bytes.
    budget = ByteBudget(options.max_inflight_request_bytes, metrics.inflight_request_bytes)
    interceptors.append(RequestBytesInterceptor(budget))
    server = grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=options.max_concurrent_rpcs or None,
        options=[
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    clip_pb2_grpc.add_ClipServiceServicer_to_server(
        ClipServicer(
            Calls(
                models,
                max_answer_bytes=options.max_message_bytes,
                backend_timeout_s=options.backend_timeout_s,
                costs=PROTO_COSTS,
            ),
            catalog=catalog,
        ),
        server,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            clip_pb2.DESCRIPTOR.services_by_name["ClipService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        ),
        server,
    )
    address = f"{options.host}:{options.port}"
    if options.tls is not None:
        port = server.add_secure_port(address, tls_server_credentials(options.tls))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    monitor = HealthMonitor(health_servicer, models)
    gateway = Gateway(options, server, port, models, monitor, metrics, catalog=catalog)
    if options.http_port >= 0:
        api = HttpApi(
            models,
            monitor,
            metrics,
            HttpOptions(
                max_body_bytes=options.max_message_bytes,
                max_concurrent=options.max_concurrent_rpcs,
                backend_timeout_s=options.backend_timeout_s,
                api_keys=options.api_keys,
                body_timeout_s=options.http_body_timeout_s,
                header_timeout_s=options.http_header_timeout_s,
                max_body_reads=options.max_http_body_reads,
                image_fetch=FetchOptions(
                    allow=options.image_url_allow,
                    max_bytes=options.max_image_bytes,
                    timeout_s=options.image_url_timeout_s,
                ),
            ),
            budget,
            CatalogRoutes(catalog, options.backend_timeout_s),
        )
        app = api.app if tracer is None else traced_asgi(api.app, tracer)
        gateway.http_server = HttpServer(
            app,
            options.host,
            options.http_port,
            options.tls,
            header_timeout_s=options.http_header_timeout_s,
            on_close=api.close,
        )
    if options.health_port >= 0:
        # Probes get the same health answers over plaintext, outside the RPC cap, auth
        # and TLS of the main port (kubelet's gRPC probe speaks neither TLS nor keys).
        gateway.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, gateway.health_server)
        health_address = f"{options.host}:{options.health_port}"
        gateway.health_port = gateway.health_server.add_insecure_port(health_address)
        if gateway.health_port == 0:
            raise OSError(f"could not bind {health_address}")
    return gateway
