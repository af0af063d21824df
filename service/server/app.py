"""Wires the gateway together: backend, cache, embedder, grpc.aio server, health, metrics."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from service import __version__
from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.backends.base import Backend
from service.core.admission import Admission
from service.core.batched_backend import BatchedBackend
from service.core.cache import EmbeddingCache
from service.core.embedder import Embedder, EmbedderOptions
from service.core.validation import Limits
from service.metrics import Metrics
from service.model.metadata import ModelMetadata
from service.server.health import HealthMonitor
from service.server.interceptors import ApiKeyInterceptor, ObservabilityInterceptor
from service.server.servicer import ClipServicer
from service.settings import Settings

_LOGGER = logging.getLogger(__name__)


def make_backend(
    settings: Settings, metadata: ModelMetadata, metrics: Metrics, admission: Admission
) -> Backend:
    """The backend the settings ask for, behind the gateway's batching queue."""
    inner: Backend
    if settings.backend == "triton":
        from service.backends.triton import TritonBackend

        inner = TritonBackend.from_settings(settings, metrics)
        inflight = settings.max_inflight_batches
    else:
        from service.backends.embedded import EmbeddedBackend

        inner = EmbeddedBackend.from_settings(settings, metadata, metrics)
        inflight = 1  # one model thread: a second batch would only wait for it, half full
    return BatchedBackend(
        inner,
        metrics=metrics,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000.0,
        max_inflight=inflight,
        admission=admission,
    )


@dataclass
class Gateway:
    """A running (or ready to run) gateway and the parts tests may look at."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    embedder: Embedder
    health: HealthMonitor
    metrics: Metrics
    metrics_port: int | None = None
    _metrics_http: Any = field(default=None, repr=False)

    async def start(self) -> None:
        """Start the backend, the server and the health monitor (NOT_SERVING until warm)."""
        try:
            await self.embedder.backend.start()
        except Exception as exc:  # e.g. Triton not up yet: health says so, we keep trying
            _LOGGER.warning("backend not started yet: %s", exc)
        await self.server.start()
        await self.health.start()
        if self.settings.metrics_port >= 0:
            http, _thread = start_http_server(
                self.settings.metrics_port, addr=self.settings.host, registry=self.metrics.registry
            )
            self._metrics_http = http
            self.metrics_port = http.server_port
        _LOGGER.info(
            "listening on %s:%d (metrics on %s), model %s, backend %s",
            self.settings.host,
            self.port,
            self.metrics_port,
            self.embedder.model_id,
            self.embedder.backend.name,
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
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self.health.shutdown()
        await self.server.stop(grace)
        await self.embedder.aclose()
        await self.embedder.backend.aclose()
        await self.embedder.cache.aclose()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None


def build_embedder(settings: Settings, metrics: Metrics) -> Embedder:
    """Backend + cache + pipeline as the settings describe (not started)."""
    metadata = ModelMetadata.load(settings.model_repository)
    admission = Admission(settings.max_queued_items, metrics)
    return Embedder(
        backend=make_backend(settings, metadata, metrics, admission),
        admission=admission,
        cache=EmbeddingCache.from_settings(settings, metrics),
        metadata=metadata,
        limits=Limits.from_settings(settings),
        metrics=metrics,
        options=EmbedderOptions(
            max_queued_items=settings.max_queued_items,
            decode_threads=settings.decode_threads,
            exif_transpose=settings.exif_transpose,
            text_length_buckets=settings.text_length_buckets,
        ),
    )


def build_gateway(settings: Settings, *, metrics: Metrics | None = None) -> Gateway:
    """Everything wired but not started; binds the gRPC port (0 = a free one)."""
    metrics = metrics or Metrics()
    embedder = build_embedder(settings, metrics)
    metadata, backend = embedder.metadata, embedder.backend
    metrics.build_info.labels(__version__, metadata.model_id, backend.name).set(1)

    interceptors: list[grpc.aio.ServerInterceptor] = [ObservabilityInterceptor(metrics)]
    keys = settings.all_api_keys()
    if keys:
        interceptors.append(ApiKeyInterceptor(keys, metrics))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    clip_pb2_grpc.add_ClipServiceServicer_to_server(
        ClipServicer(embedder, backend_timeout_s=settings.backend_timeout_s), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            clip_pb2.DESCRIPTOR.services_by_name["ClipService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert and settings.tls_key:
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
        credentials = grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    monitor = HealthMonitor(health_servicer, embedder)
    return Gateway(settings, server, port, embedder, monitor, metrics)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    gateway = build_gateway(settings)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    _LOGGER.info(
        "shutting down: NOT_SERVING, draining in-flight calls (%ss)", settings.shutdown_grace_s
    )
    await gateway.stop()
    _LOGGER.info("stopped")
