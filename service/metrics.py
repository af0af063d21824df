"""Every Prometheus metric the gateway exports, in one registry per server.

Names follow Prometheus conventions: `clip_` prefix, base units (`_seconds`,
`_bytes`), `_total` on counters. Labels only take values from small fixed sets
(RPC method, status code, modality, cache level, backend, stage, and `model`: the
names in the repository, fixed at start-up; '' where a call names an unknown model).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The gateway's metric families, bound to their own registry (tests make many)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "clip_requests",
            "Calls finished (gRPC, and HTTP as method http:<route>), by method, gRPC status "
            "code and model.",
            ["method", "code", "model"],
            registry=r,
        )
        self.request_latency = Histogram(
            "clip_request_duration_seconds",
            "Wall time of a call from arrival to answer, by method and model.",
            ["method", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "clip_requests_in_flight", "RPCs being handled now, by method.", ["method"], registry=r
        )
        self.auth_failures = Counter(
            "clip_auth_failures", "Calls refused as UNAUTHENTICATED.", registry=r
        )
        self.items = Counter(
            "clip_items_embedded",
            "Inputs embedded (cache hits included), by modality and model.",
            ["modality", "model"],
            registry=r,
        )
        self.cache_hits = Counter(
            "clip_cache_hits", "Cache lookups that found a vector, by level.", ["level"], registry=r
        )
        self.cache_misses = Counter(
            "clip_cache_misses",
            "Cache lookups that found nothing, by level.",
            ["level"],
            registry=r,
        )
        self.cache_errors = Counter(
            "clip_cache_errors",
            "Cache operations that failed (the request went on without the cache), by level.",
            ["level"],
            registry=r,
        )
        self.cache_corrupt = Counter(
            "clip_cache_corrupt",
            "Shared-cache values refused on read (wrong length, flags or norm): served as misses.",
            registry=r,
        )
        self.cache_breaker_open = Gauge(
            "clip_cache_breaker_open",
            "1 while the Redis circuit breaker is open (Redis is skipped), else 0.",
            registry=r,
        )
        self.backend_latency = Histogram(
            "clip_backend_duration_seconds",
            "Time of one backend call (a batch), by backend and modality.",
            ["backend", "modality"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            "clip_backend_errors",
            "Backend calls that failed, by backend and modality.",
            ["backend", "modality"],
            registry=r,
        )
        self.catalog_engine_restarts = Counter(
            "clip_catalog_engine_restarts",
            "Times the embedded catalog engine (--catalog FILE) died and was started again.",
            registry=r,
        )
        self.batch_size = Histogram(
            "clip_batch_size",
            "Items per forward pass of the batching queue, by modality.",
            ["modality"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "clip_queue_wait_seconds",
            "Time an item waited in the batching queue before its batch ran, by modality.",
            ["modality"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queued_items = Gauge(
            "clip_queued_items", "Items admitted and waiting for the backend.", registry=r
        )
        self.inflight_request_bytes = Gauge(
            "clip_inflight_request_bytes",
            "Bytes of request messages being handled (bounded by --max-inflight-request-bytes).",
            registry=r,
        )
        self.rejected_items = Counter(
            "clip_rejected_items",
            "Items refused with RESOURCE_EXHAUSTED because the queue was full.",
            registry=r,
        )
        # Per priority lane (interactive, bulk): see service/core/lanes.py.
        self.lane_queued_items = Gauge(
            "clip_lane_queued_items",
            "Items admitted and waiting for the backend, by priority lane.",
            ["lane"],
            registry=r,
        )
        self.lane_rejected_items = Counter(
            "clip_lane_rejected_items",
            "Items refused with RESOURCE_EXHAUSTED because their lane's bound was full, by lane.",
            ["lane"],
            registry=r,
        )
        self.lane_queue_wait = Histogram(
            "clip_lane_queue_wait_seconds",
            "Time an item waited in the batching queue before its batch ran, by priority lane.",
            ["lane"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lane_batches = Counter(
            "clip_lane_batches",
            "Backend batches run, by the lane they were formed from.",
            ["lane"],
            registry=r,
        )
        self.preprocess_latency = Histogram(
            "clip_preprocess_duration_seconds",
            "Time to turn one input into a tensor, by stage (image_decode, tokenize).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.triton_image_batches = Counter(
            "clip_triton_image_batches",
            "Image batches sent to Triton with --triton-shared-memory, by transport: "
            "shared_memory, or grpc (no slot free, not registered yet, or refused).",
            ["transport"],
            registry=r,
        )
        # A slot in use outlives its call only while Triton holds the batch: a count that
        # stays below the total at idle is a leak, and image batches then go as bytes.
        self.triton_shared_memory_slots_free = Gauge(
            "clip_triton_shared_memory_slots_free",
            "Free slots of the --triton-shared-memory region (2 × --max-inflight-batches "
            "when idle).",
            registry=r,
        )
        self.model_mismatch = Gauge(
            "clip_model_mismatch",
            "1 while Triton serves another model than metadata.json describes (or one exported "
            "without its identity): calls get FAILED_PRECONDITION, health NOT_SERVING.",
            registry=r,
        )
        self.build_info = Gauge(
            "clip_build_info",
            "Always 1; labels say which build, model and backend serve.",
            ["version", "model", "backend"],
            registry=r,
        )
