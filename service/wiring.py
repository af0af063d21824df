"""The one reader of `Settings`: builds the backend, cache, pipeline and server from them.

Every part below gets plain values; each default lives once, in `service/settings.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opentelemetry import trace

from service import __version__
from service.backends.base import Backend
from service.core.admission import Admission
from service.core.batched_backend import BatchedBackend
from service.core.cache import EmbeddingCache, RedisOptions
from service.core.catalog import Catalog, CatalogLimits
from service.core.embedder import Decoding, Embedder, EmbedderOptions
from service.core.models import ModelRegistry, ServedModel, pick_default
from service.core.scoring import Scorer
from service.core.validation import Limits
from service.cpus import usable_cpus
from service.memory import tune_malloc
from service.metrics import Metrics
from service.model.metadata import DEFAULT_NAME, ModelMetadata, load_repository
from service.server.app import Gateway, ServerOptions, build_server
from service.server.credentials import ApiKeys, TlsFiles
from service.settings import Settings
from service.telemetry import NO_TRACER, SCOPE, build_tracer_provider

_LOGGER = logging.getLogger(__name__)


def build_backend(
    settings: Settings,
    metadata: ModelMetadata,
    metrics: Metrics,
    admission: Admission,
    tracer: trace.Tracer = NO_TRACER,
) -> Backend:
    """The backend the settings ask for, behind the gateway's batching queue."""
    inner: Backend
    if settings.backend == "triton":
        from service.backends.triton import TritonBackend

        # The `clip` model keeps its configurable Triton names; the others are NAME_*.
        named = metadata is None or metadata.name == DEFAULT_NAME
        inner = TritonBackend(
            url=settings.triton_url,
            image_model=settings.triton_image_model if named else metadata.image_model,
            text_model=settings.triton_text_model if named else metadata.text_model,
            model_version=settings.triton_model_version,
            default_timeout_s=settings.backend_timeout_s,
            metrics=metrics,
            max_batch_size=settings.max_batch_size,
            # Serve nothing until Triton serves the model this metadata.json describes.
            expected_model_id=metadata.model_id if metadata is not None else None,
            expected_weights_sha256=metadata.weights_sha256 if metadata is not None else None,
            # A slot per batch in flight, and as many again for split calls and probes.
            shared_memory_slots=(
                2 * settings.max_inflight_batches if settings.triton_shared_memory else 0
            ),
        )
        inflight = settings.max_inflight_batches
    else:
        runtime: Callable[..., Backend]
        if metadata.is_onnx:  # the repository decides the in-process runtime, no flag
            from service.backends.onnx import OnnxBackend

            if settings.device != "cpu":
                raise ValueError(
                    f"the onnx flavor runs on the CPU in-process, not {settings.device}"
                )
            runtime = OnnxBackend
        else:
            from service.backends.embedded import EmbeddedBackend

            runtime = functools.partial(EmbeddedBackend, device=settings.device)
        inner = runtime(
            settings.model_repository,
            metadata,
            metrics=metrics,
            max_batch_size=settings.max_batch_size,
            threads=settings.torch_threads,
        )
        inflight = 1  # one model thread: a second batch would only wait for it, half full
    return BatchedBackend(
        inner,
        metrics=metrics,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000.0,
        max_inflight=inflight,
        admitted=lambda lane: admission.by_lane[lane],
        trim_text=metadata is None or metadata.text_padding != "full",
        bulk_max_wait_s=settings.bulk_max_wait_ms / 1000.0,
        tracer=tracer,
    )


def build_cache(settings: Settings, metrics: Metrics) -> EmbeddingCache:
    """The in-process LRU, with Redis behind it when `redis_url` is set."""
    redis = None
    if settings.redis_url:
        redis = RedisOptions(
            url=settings.redis_url,
            ttl_s=settings.cache_ttl_s,
            timeout_s=settings.redis_timeout_s,
            breaker_failures=settings.redis_breaker_failures,
            breaker_reset_s=settings.redis_breaker_reset_s,
        )
    return EmbeddingCache(
        metrics=metrics,
        local_items=settings.local_cache_items,
        local_bytes=settings.local_cache_bytes,
        redis=redis,
    )


def build_admission(settings: Settings, metrics: Metrics) -> Admission:
    """The admission bounds of both priority lanes."""
    return Admission(settings.max_queued_items, metrics, bulk_limit=settings.max_queued_bulk_items)


def build_limits(settings: Settings) -> Limits:
    """The caller-facing limits named in `settings`."""
    # Each limit is the setting of the same name.
    return Limits(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(Limits)})


def build_embedder(
    settings: Settings,
    metrics: Metrics,
    *,
    metadata: ModelMetadata | None = None,
    admission: Admission | None = None,
    cache: EmbeddingCache | None = None,
    label_cache: EmbeddingCache | None = None,
    decoding: Decoding | None = None,
    tracer: trace.Tracer = NO_TRACER,
) -> Embedder:
    """Backend + cache + pipeline of one model (not started): `metadata`'s, else the
    repository's default model. The others are shared when several models are served."""
    if metadata is None:
        models = load_repository(settings.model_repository)
        metadata = models[pick_default(list(models), settings.default_model)]
    if admission is None:
        admission = build_admission(settings, metrics)
    # `is None`, not `or`: an empty cache is falsy (it has a length), and `or` gave every
    # model a cache of its own, each with its own LRU bounds, Redis pool and breaker.
    if cache is None:
        cache = build_cache(settings, metrics)
    if label_cache is None:
        label_cache = cache.with_own_lru(settings.label_cache_items)
    if decoding is None:
        decoding = build_decoding(settings)
    return Embedder(
        backend=build_backend(settings, metadata, metrics, admission, tracer),
        cache=cache,
        label_cache=label_cache,
        metadata=metadata,
        limits=build_limits(settings),
        metrics=metrics,
        admission=admission,
        options=EmbedderOptions(
            decode_threads=settings.decode_threads or usable_cpus(),
            decode_budget_pixels=settings.decode_budget_pixels,
            exif_transpose=settings.exif_transpose,
            fast_jpeg=settings.fast_jpeg,
            text_length_buckets=settings.text_length_buckets,
        ),
        decoding=decoding,
        tracer=tracer,
    )


def build_decoding(settings: Settings) -> Decoding:
    """The decode threads and pixel budget (one per gateway, shared by every model)."""
    return Decoding(settings.decode_threads or usable_cpus(), settings.decode_budget_pixels)


def build_registry(
    settings: Settings, metrics: Metrics, tracer: trace.Tracer = NO_TRACER
) -> ModelRegistry:
    """One pipeline per model of the repository, sharing the admission bound, the cache,
    the decode threads and the decode pixel budget (each bounds the whole gateway)."""
    models = load_repository(settings.model_repository)
    default = pick_default(list(models), settings.default_model)
    if settings.max_items > settings.max_queued_items:
        # Admission takes a request's misses at once: a larger one is refused even idle.
        _LOGGER.warning(
            "--max-items %d is over --max-queued-items %d: requests with more uncached "
            "items than the queue bound are refused as busy",
            settings.max_items,
            settings.max_queued_items,
        )
    admission = build_admission(settings, metrics)
    cache = build_cache(settings, metrics)
    label_cache = cache.with_own_lru(settings.label_cache_items)
    decoding = build_decoding(settings)
    served = []
    for name, metadata in models.items():
        embedder = build_embedder(
            settings,
            metrics,
            metadata=metadata,
            admission=admission,
            cache=cache,
            label_cache=label_cache,
            decoding=decoding,
            tracer=tracer,
        )
        served.append(ServedModel(name, embedder, Scorer(embedder)))
    return ModelRegistry(served, default)


def server_options(settings: Settings) -> ServerOptions:
    """The transport's settings as plain values."""
    tls = None
    if settings.tls_cert and settings.tls_key:
        tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return ServerOptions(
        host=settings.host,
        port=settings.port,
        metrics_port=settings.metrics_port,
        max_message_bytes=settings.max_message_bytes,
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        max_inflight_request_bytes=settings.max_inflight_request_bytes,
        health_port=settings.health_port,
        http_port=settings.http_port,
        shutdown_grace_s=settings.shutdown_grace_s,
        backend_timeout_s=settings.backend_timeout_s,
        api_keys=ApiKeys(frozenset(settings.api_keys), settings.api_keys_file),
        tls=tls,
        http_header_timeout_s=settings.http_header_timeout_s,
        http_body_timeout_s=settings.http_body_timeout_s,
        max_http_body_reads=settings.max_http_body_reads,
        image_url_allow=settings.image_url_allow,
        image_url_timeout_s=settings.image_url_timeout_s,
        max_image_bytes=settings.max_image_bytes,
    )


def is_catalog_server(uri: str) -> bool:
    """A Milvus server address (else `--catalog` is a file for the embedded engine)."""
    return uri.startswith(("http://", "https://", "tcp://", "unix:"))


def build_catalog(
    settings: Settings, models: ModelRegistry, metrics: Metrics
) -> tuple[Catalog, Callable[[], None]]:
    """The catalog `--catalog` names (the embedded engine started now, and restarted
    whenever it dies), and how to stop what was started."""
    from service.backends.milvus_store import MilvusStore
    from service.backends.vector_store import IndexSettings

    engine = None
    uri = settings.catalog
    if not is_catalog_server(uri):
        from service.processes.milvus_lite import MilvusLite

        path = Path(uri).expanduser()
        # Next to the catalog file: its log, readable after a failed start.
        engine = MilvusLite(path, log_path=path.with_name(path.name + ".engine.log"))
        engine.start()
        uri = engine.uri
    index = IndexSettings(
        index_type=settings.catalog_index,
        nlist=settings.catalog_nlist,
        nprobe=settings.catalog_nprobe,
        hnsw_ef=settings.catalog_hnsw_ef,
    )
    try:
        store = MilvusStore(
            uri,
            token=settings.catalog_token,
            index=index,
            timeout_s=settings.backend_timeout_s,
            # The embedded engine's file lock admits one gateway: the only writer.
            sole_writer=engine is not None,
        )
    except BaseException:
        if engine is not None:
            engine.stop()
        raise
    limits = CatalogLimits(
        max_top_k=settings.catalog_max_top_k,
        max_metadata_bytes=settings.catalog_max_metadata_bytes,
        max_ids=settings.max_items,
    )
    # The gateway owns the embedded engine: nothing else would restart it after a crash
    # (the store reconnects to the same socket by itself; the file keeps the items).
    supervisor = None
    if engine is not None:
        from service.processes.supervisor import Supervisor

        supervisor = Supervisor(engine, on_restart=metrics.catalog_engine_restarts.inc)
        supervisor.start()

    def stop() -> None:
        if supervisor is not None:
            supervisor.stop()  # first: a stop on purpose is no crash to restart from
        if engine is not None:
            engine.stop()

    return Catalog(models, store, limits), stop


def build_gateway(
    settings: Settings, *, metrics: Metrics | None = None, tracer_provider: Any = None
) -> Gateway:
    """Everything wired but not started; binds the gRPC port (0 = a free one).
    `tracer_provider`: an OpenTelemetry SDK provider to trace into (tests); None: one
    exporting to `settings.otlp_endpoint` when set, else no tracing."""
    metrics = metrics or Metrics()
    if tracer_provider is None and settings.otlp_endpoint:
        tracer_provider = build_tracer_provider(
            settings.otlp_endpoint,
            settings.otlp_service_name,
            sample_ratio=settings.otlp_sample_ratio,
        )
    tracer = tracer_provider.get_tracer(SCOPE) if tracer_provider is not None else None
    models = build_registry(settings, metrics, tracer or NO_TRACER)
    for model in models:
        embedder = model.embedder
        metrics.build_info.labels(__version__, embedder.model_id, embedder.backend_name).set(1)
    catalog, stop_catalog = (
        build_catalog(settings, models, metrics) if settings.catalog else (None, None)
    )
    try:
        gateway = build_server(server_options(settings), models, metrics, catalog, tracer)
    except BaseException:
        if stop_catalog is not None:
            stop_catalog()
        raise
    if stop_catalog is not None:
        gateway.on_stop.append(stop_catalog)
    gateway.tracer_provider = tracer_provider
    return gateway


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    tune_malloc()  # a process-wide allocator setting: the process's own
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
