"""Every setting, in one module: what `clipsvc serve`, `export` and `triton` can be told.

Each group is a frozen dataclass whose fields are `--flags`; a field's annotation is its
type (parsed from strings the same way for flags and environment variables) and its
help text is its documentation. `Settings` (the gateway's) gives every field a
`CLIP_*` environment twin. Built once in the CLI (or by tests with `Settings(...)`)
and handed to `service.wiring`, the only reader; nothing reads the environment at
import time. Bad values raise `ValueError`; only the CLI turns that into an exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
_SECRET_FIELDS = {"api_keys", "redis_url", "catalog_token"}
_REQUIRED: Any = dataclasses.MISSING


class SettingsError(ValueError):
    """A setting's value is malformed or not allowed (the CLI's usage error)."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A field: its default, its help text, and optional `choices` / `env` (a fixed name)."""
    return field(default=default, metadata={"help": help, **extra})


class FlagSet:
    """Turns a frozen dataclass into `--flags` and parses them by the fields' annotations.

    Precedence: defaults < environment (where the field has a twin) < flags.
    """

    #: Environment twin of field `x` is `ENV_PREFIX + X`; None = only fields with `env=`.
    ENV_PREFIX: ClassVar[str | None] = None

    def replace(self, **changes: Any) -> typing.Self:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise SettingsError(
                    f"bad value for {f.name}: {value!r}; choose one of {', '.join(choices)}"
                )

    @classmethod
    def env_name(cls, f: dataclasses.Field[Any]) -> str | None:
        """The environment variable that sets field `f`, if any."""
        if "env" in f.metadata:
            return str(f.metadata["env"])
        return None if cls.ENV_PREFIX is None else cls.ENV_PREFIX + f.name.upper()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one `--flag` per field (values stay strings until `from_sources`)."""
        hints = typing.get_type_hints(cls)
        for f in fields(cls):  # type: ignore[arg-type]
            flag = "--" + f.name.replace("_", "-")
            env = cls.env_name(f)
            help_text = str(f.metadata["help"]) + (f" [env {env}]" if env else "")
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if _base_type(hints[f.name]) is bool:
                parser.add_argument(
                    flag,
                    dest=f.name,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
                continue
            if not required:
                help_text += f" (default: {show_value(f.default)})"
            parser.add_argument(
                flag,
                dest=f.name,
                default=argparse.SUPPRESS,
                required=required and env is None,
                choices=f.metadata.get("choices"),
                help=help_text,
            )

    @classmethod
    def from_sources(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> typing.Self:
        """Defaults, overridden by environment twins, overridden by flags."""
        environ = os.environ if environ is None else environ
        given = vars(args) if args is not None else {}
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            env = cls.env_name(f)
            if f.name in given:
                values[f.name] = parse_value(f.name, hints[f.name], given[f.name])
            elif env is not None and env in environ:
                values[f.name] = parse_value(f.name, hints[f.name], environ[env])
        return cls(**values)


def _base_type(annotation: Any) -> Any:
    """`X | None` → X; anything else unchanged."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def parse_value(name: str, annotation: Any, raw: Any) -> Any:
    """A flag's or variable's text → the field's type; SettingsError naming the field."""
    if not isinstance(raw, str):
        return raw  # already typed (a bool flag, or a caller passing values)
    optional = _base_type(annotation) is not annotation
    kind = _base_type(annotation)
    text = raw.strip()
    try:
        if optional and text == "":
            return None
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("not a boolean (true/false, 1/0, yes/no, on/off)")
        if kind in (int, float, str, Path):
            return kind(text)
        if typing.get_origin(kind) is tuple:
            (item,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
            return tuple(item(p.strip()) for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise SettingsError(f"bad value for {name}: {raw!r} ({exc})") from None
    raise TypeError(f"{name}: no parser for the annotation {annotation!r}")


def show_value(value: Any) -> str:
    """A default as the help text and the README table show it."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "''"
    return repr(value) if value == "" else str(value)


@dataclass(frozen=True)
class Settings(FlagSet):
    """Everything the gateway (`clipsvc serve`) can be told. The help text is the documentation."""

    ENV_PREFIX: ClassVar[str | None] = "CLIP_"

    # --- transport
    host: str = _opt("0.0.0.0", "Address the gRPC server binds to.")
    port: int = _opt(50051, "gRPC port (0 picks a free one).")
    metrics_port: int = _opt(9090, "Prometheus /metrics port (0 picks a free one, -1 disables).")
    max_message_bytes: int = _opt(
        64 * 1024 * 1024, "Largest gRPC message accepted or sent, in bytes."
    )
    max_concurrent_rpcs: int = _opt(
        1024,
        "RPCs handled at once (streams count while open); past it, RESOURCE_EXHAUSTED. With "
        "--max-message-bytes it bounds the request bytes held. 0 = no limit.",
    )
    max_inflight_request_bytes: int = _opt(
        512 * 1024 * 1024,
        "Bytes of request messages handled at once (decoding, queued, in the backend), gRPC "
        "and HTTP together; past it, RESOURCE_EXHAUSTED (HTTP 429). A larger request still "
        "runs when it is alone.",
    )
    http_port: int = _opt(
        8080,
        "HTTP port of the JSON API (OpenAI-compatible /v1/embeddings, /v1/models, "
        "/v1/classify, /v1/similarity, /health, /ready), same address, keys, limits and TLS "
        "files as gRPC (0 picks a free one, -1 disables).",
    )
    http_header_timeout_s: float = _opt(
        10.0,
        "Seconds an HTTP connection may take to send a request's headers (from its opening, "
        "or from the first byte of the next request); past it, the connection is closed.",
    )
    http_body_timeout_s: float = _opt(
        30.0,
        "Seconds an HTTP request's whole body may take to arrive once its headers are in; "
        "past it, 408 and the connection is closed (a slow sender holds no call slot).",
    )
    max_http_body_reads: int = _opt(
        64,
        "HTTP request bodies being received at once; past it, 429 at once. Their bytes count "
        "in --max-inflight-request-bytes as they arrive.",
    )
    health_port: int = _opt(
        -1,
        "Plaintext port serving only grpc.health.v1, for probes when TLS or API keys are on "
        "(0 picks a free one, -1 disables).",
    )
    shutdown_grace_s: float = _opt(
        20.0, "Seconds in-flight calls get to finish after SIGTERM before they are cancelled."
    )
    # --- model and backend
    backend: str = _opt("embedded", "Where the encoders run.", choices=("embedded", "triton"))
    model_repository: Path = _opt(
        DEFAULT_MODEL_REPOSITORY,
        "Exported model repository (metadata.json + clip_*/1/model.pt or model.onnx); every "
        "model in it is served (`clipsvc export --name`).",
    )
    default_model: str = _opt(
        "",
        "Model that answers requests naming none ('' = `clip` when the repository has it, "
        "else its only model; a repository with several and no `clip` needs this).",
    )
    triton_url: str = _opt(
        "127.0.0.1:8001",
        "Triton gRPC target (backend=triton): host:port (one replica), ipv4:a:p,b:p / "
        "ipv6:[a]:p,[b]:p, or dns:///name:port (a headless Service, looked up again every "
        "30 s); the gateway keeps a channel per address, calls go round robin over the "
        "replicas whose model it has checked and that are ready, and a call that finds its "
        "replica gone is retried on another within the deadline.",
    )
    triton_image_model: str = _opt(
        "clip_image",
        "Triton model name of the image encoder of the model named `clip` "
        "(the others: NAME_image).",
    )
    triton_text_model: str = _opt(
        "clip_text",
        "Triton model name of the text encoder of the model named `clip` (the others: NAME_text).",
    )
    triton_model_version: str = _opt("", "Triton model version ('' = the server's policy).")
    triton_shared_memory: bool = _opt(
        False,
        "Send image batches to Triton through POSIX shared memory (/dev/shm) instead of gRPC "
        "bytes: less gateway CPU per image. Only for a Triton on the same host or in the same "
        "pod with a shared /dev/shm; a replica that cannot map it gets bytes.",
    )
    backend_timeout_s: float = _opt(
        30.0, "Longest a backend call may take when the caller set no deadline."
    )
    device: str = _opt("cpu", "Torch device of the embedded backend (cpu, cuda, cuda:1).")
    torch_threads: int = _opt(
        0,
        "Intra-op threads of the embedded backend, TorchScript or ONNX Runtime "
        "(0 = the runtime's default).",
    )
    # --- batching (the gateway's queue, in front of either backend)
    max_batch_size: int = _opt(
        32, "Most items in one backend call (Triton: also capped by the model's max_batch_size)."
    )
    max_batch_wait_ms: float = _opt(
        2.0, "How long the batching queue waits for more items once it has some."
    )
    max_inflight_batches: int = _opt(
        1,
        "Batches sent to Triton at once; more keeps a fast GPU busy through round trips "
        "(the embedded backend runs one at a time).",
    )
    max_queued_items: int = _opt(
        2048,
        "Interactive items waiting for the backend before new interactive calls get "
        "RESOURCE_EXHAUSTED (bulk work has its own bound, --max-queued-bulk-items).",
    )
    max_queued_bulk_items: int = _opt(
        1024,
        "Bulk items (EmbedStream, priority bulk) waiting for the backend before new bulk work "
        "gets RESOURCE_EXHAUSTED; apart from --max-queued-items, so bulk cannot fill it.",
    )
    bulk_max_wait_ms: float = _opt(
        1000.0,
        "Age at which a queued bulk item goes before interactive work: bulk never starves "
        "(under interactive overload it still gets a batch this often).",
    )
    text_length_buckets: tuple[int, ...] = _opt(
        (8, 16, 24, 32, 48, 77),
        "Token-length bucket edges: a text is padded to the edge of its bucket only.",
    )
    decode_threads: int = _opt(
        0, "Threads decoding images (0 = the CPUs this process may use: affinity, cgroup quota)."
    )
    decode_budget_pixels: int = _opt(
        64_000_000,
        "Pixels all image decodes may hold at once; a decode past it waits (bounds memory).",
    )
    # --- limits
    max_items: int = _opt(
        2048,
        "Most texts or images in one request (OpenAI's /v1/embeddings cap); a request is "
        "still bounded by --max-message-bytes and is run in backend batches of "
        "--max-batch-size. Keep it at most --max-queued-items: a request is admitted whole.",
    )
    max_image_bytes: int = _opt(20 * 1024 * 1024, "Largest encoded image, in bytes.")
    max_image_pixels: int = _opt(
        50_000_000, "Largest decoded image (width × height); guards against bombs."
    )
    max_text_chars: int = _opt(
        10_000, "Longest text in characters (texts past the context length are truncated)."
    )
    max_labels: int = _opt(1000, "Most labels in one Classify call.")
    max_templates: int = _opt(32, "Most templates in one Classify call.")
    max_label_chars: int = _opt(300, "Longest label or template, in characters.")
    max_prompts: int = _opt(
        8192,
        "Most prompts (labels × templates) in one Classify call; past it, INVALID_ARGUMENT.",
    )
    exif_transpose: bool = _opt(
        True, "Rotate images by their EXIF orientation before preprocessing."
    )
    fast_jpeg: bool = _opt(
        False,
        "Decode large JPEGs at a reduced size (libjpeg DCT scaling, never below 2x the "
        "model's image size) before the resize and crop: about 2-4x less CPU for photos "
        "of 2-12 megapixels, vectors no longer bit-identical to open_clip's (README: "
        "measured cosine). Off: open_clip's exact path.",
    )
    # --- catalog (vector search over stored items)
    catalog: str = _opt(
        "",
        "Catalog store: a file path (./catalog.db: an embedded Milvus Lite engine, started "
        "and stopped with the gateway) or a Milvus server URL (http://host:19530); one "
        "collection per model id. '' = no catalog (its calls answer UNIMPLEMENTED).",
    )
    catalog_token: str = _opt("", "Milvus server token (user:password or an API key).")
    catalog_index: str = _opt(
        "FLAT",
        "Index type of new collections (COSINE). FLAT is exact. Milvus Lite also builds "
        "IVF_FLAT and AUTOINDEX but ignores nprobe (recall@10 0.90 at 100k, bench/results/"
        "catalog.md); on a Milvus server choose HNSW or IVF_FLAT for large catalogs.",
        choices=("FLAT", "IVF_FLAT", "AUTOINDEX", "HNSW"),
    )
    catalog_nlist: int = _opt(1024, "IVF_FLAT: clusters the vectors are split into.")
    catalog_nprobe: int = _opt(32, "IVF_FLAT: clusters searched per query (recall against speed).")
    catalog_hnsw_ef: int = _opt(128, "HNSW: search breadth (at least top_k is used).")
    catalog_max_top_k: int = _opt(1000, "Most hits one search may ask for.")
    catalog_max_metadata_bytes: int = _opt(
        16 * 1024, "Largest metadata JSON of one item (and largest search filter), in bytes."
    )
    # --- cache
    redis_url: str = _opt("", "Redis URL for the shared cache ('' = in-process cache only).")
    cache_ttl_s: int = _opt(7 * 24 * 3600, "Time to live of a Redis cache entry, in seconds.")
    local_cache_items: int = _opt(10_000, "Entries in the in-process LRU (0 disables it).")
    local_cache_bytes: int = _opt(
        256 * 1024 * 1024, "Bytes of vectors the in-process LRU may hold (with the entry cap)."
    )
    label_cache_items: int = _opt(
        4096, "Zero-shot label ensembles kept in an LRU of their own (0 disables it)."
    )
    redis_timeout_s: float = _opt(0.1, "Timeout of each Redis call.")
    redis_breaker_failures: int = _opt(
        3, "Consecutive Redis errors that open the breaker (Redis skipped for a while)."
    )
    redis_breaker_reset_s: float = _opt(5.0, "Seconds the breaker stays open before a retry.")
    # --- security
    api_keys: tuple[str, ...] = _opt(
        (), "Accepted API keys (comma-separated); empty = no auth. Prefer --api-keys-file."
    )
    api_keys_file: Path | None = _opt(None, "File with one API key per line.")
    tls_cert: Path | None = _opt(
        None, "PEM certificate chain for TLS on the gRPC port (and HTTPS on the HTTP port)."
    )
    tls_key: Path | None = _opt(None, "PEM private key for TLS.")
    tls_client_ca: Path | None = _opt(None, "PEM CA bundle; when set, clients need a certificate.")
    image_url_allow: tuple[str, ...] = _opt(
        (),
        "Hosts image URLs may be fetched from over HTTP (comma-separated; '.example.com' = "
        "any host under it); empty = URLs refused. Private, loopback and link-local "
        "addresses only for hosts named exactly.",
    )
    image_url_timeout_s: float = _opt(
        10.0, "Seconds one image URL fetch may take (redirects included), within the call's."
    )
    # --- tracing
    otlp_endpoint: str = _opt(
        "",
        "OTLP/gRPC endpoint traces are exported to (http://collector:4317; http:// = "
        "plaintext); '' = OTEL_EXPORTER_OTLP_ENDPOINT when set, else no tracing at all.",
    )
    otlp_service_name: str = _opt("clip-gateway", "service.name of the exported traces.")
    otlp_sample_ratio: float = _opt(
        1.0,
        "Share of new traces recorded (a caller's sampled traceparent is always followed); "
        "lower it to bound tracing's cost (see bench/results/tracing.md).",
    )
    log_level: str = _opt("INFO", "Log level.")

    def __post_init__(self) -> None:
        super().__post_init__()
        # Bucket edges are a set: sorted and unique whatever order they were given in.
        object.__setattr__(
            self, "text_length_buckets", tuple(sorted(set(self.text_length_buckets)))
        )

    @classmethod
    def from_sources(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> typing.Self:
        """As `FlagSet.from_sources`; the standard OTEL_EXPORTER_OTLP_ENDPOINT stands in for
        --otlp-endpoint (and CLIP_OTLP_ENDPOINT) when neither is given."""
        settings = super().from_sources(args, environ)
        environ = os.environ if environ is None else environ
        standard = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        if not settings.otlp_endpoint and standard:
            settings = settings.replace(otlp_endpoint=standard)
        return settings

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with secrets hidden, for the start-up log."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value:
                value = "***" if f.name != "api_keys" else f"<{len(value)} keys>"
            out[f.name] = value
        return out


@dataclass(frozen=True)
class BatchingOptions(FlagSet):
    """Triton's dynamic-batching and queueing knobs, written into both `config.pbtxt`."""

    max_batch_size: int = _opt(32, "Triton max_batch_size.")
    instances: int = _opt(1, "Model instances per device.")
    max_queue_delay_us: int = _opt(
        2000, "Dynamic batcher's wait for a fuller batch, in microseconds."
    )
    # Overload turns into fast refusals instead of growing latency.
    max_queue_size: int = _opt(256, "Requests Triton queues before refusing new ones.")
    queue_timeout_us: int = _opt(
        10_000_000, "Longest a request waits in Triton's queue before it is refused."
    )
    torch_threads: int = _opt(
        0,
        "Threads per instance: torch's (python flavor) or ONNX Runtime's intra-op threads "
        "(onnx flavor); 0 = the runtime's default.",
    )


@dataclass(frozen=True)
class ExportSettings(FlagSet):
    """What `clipsvc export` is told (with `BatchingOptions` for the Triton configs)."""

    model: str = _opt(
        _REQUIRED,
        "open_clip model name (ViT-B-32, ViT-B-16-SigLIP2, clip-demo-shapes) or the path of "
        "an open_clip model-config JSON (the model's name is the file's stem).",
    )
    out: Path = _opt(_REQUIRED, "Output model repository directory.")
    name: str = _opt(
        "clip",
        "Name the model is served under; its Triton models are NAME_image and NAME_text. "
        "Exports with different names share one --out repository without touching each other.",
    )
    pretrained: str = _opt("none", "Pretrained tag, a checkpoint PATH, or 'none'.")
    flavor: str = _opt(
        "python",
        "pytorch: libtorch backend on GPU (NGC image); python: pip tritonserver; "
        "onnx: model.onnx for ONNX Runtime (NGC image on CPU or GPU, and clipsvc serve).",
        choices=("pytorch", "python", "onnx"),
    )
    precision: str = _opt(
        "fp32",
        "Weights of the TorchScript towers: fp16 halves them for GPUs (inputs, normalisation "
        "and outputs stay float32; the self-check wants cosine >= 0.999 against fp32).",
        choices=("fp32", "fp16"),
    )
    tensorrt: bool = _opt(
        False,
        "onnx flavor: add TensorRT (fp16) as Triton's GPU execution accelerator (KIND_GPU).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tensorrt and self.flavor != "onnx":
            raise SettingsError(f"--tensorrt needs --flavor onnx, not {self.flavor!r}")
        if self.precision == "fp16" and self.flavor == "onnx":
            raise SettingsError("--precision fp16 is for TorchScript; the onnx flavor: --tensorrt")
        from service.model.metadata import check_name

        try:
            check_name(self.name)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None


@dataclass(frozen=True)
class TritonServerSettings(FlagSet):
    """What `clipsvc triton` (the pip tritonserver run locally) is told."""

    repository: Path = _opt(
        DEFAULT_MODEL_REPOSITORY,
        "Exported model repository, python flavor (`clipsvc export --flavor python`).",
        env="CLIP_MODEL_REPOSITORY",
    )
    host: str = _opt("127.0.0.1", "Address all three endpoints bind to.")
    port: int = _opt(8001, "gRPC port; 0 picks a free one.")
    http_port: int = _opt(8000, "HTTP/REST port.")
    metrics_port: int = _opt(8002, "Triton's /metrics port.")
    log_file: Path | None = _opt(None, "Write the server's log here instead of to this terminal.")
    startup_timeout: float = _opt(
        120.0, "Seconds to wait for the server and every model to be ready."
    )
    stop_grace: float = _opt(10.0, "Seconds the server gets to exit after SIGTERM before SIGKILL.")
    otlp_url: str = _opt(
        "",
        "OTLP/HTTP traces URL (http://collector:4318/v1/traces): turns on Triton's "
        "OpenTelemetry tracing of inference requests ('' = off).",
        env="CLIP_TRITON_OTLP_URL",
    )
    trace_rate: int = _opt(
        1,
        "With --otlp-url: trace one inference request in this many.",
        env="CLIP_TRITON_TRACE_RATE",
    )
