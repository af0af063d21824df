"""The one settings object: every field is a `--flag` with a `CLIP_*` environment twin.

Built once (in the CLI, or by tests with `Settings(...)`) and passed down explicitly;
nothing reads the environment at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
_SECRET_FIELDS = {"api_keys", "redis_url"}


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    """Everything the gateway can be told. The help text is the documentation."""

    # --- transport
    host: str = _opt("0.0.0.0", "Address the gRPC server binds to.")
    port: int = _opt(50051, "gRPC port (0 picks a free one).")
    metrics_port: int = _opt(9090, "Prometheus /metrics port (0 picks a free one, -1 disables).")
    max_message_bytes: int = _opt(
        64 * 1024 * 1024, "Largest gRPC message accepted or sent, in bytes."
    )
    shutdown_grace_s: float = _opt(
        20.0, "Seconds in-flight calls get to finish after SIGTERM before they are cancelled."
    )
    # --- model and backend
    backend: str = _opt("embedded", "Where the encoders run.", choices=("embedded", "triton"))
    model_repository: Path = _opt(
        DEFAULT_MODEL_REPOSITORY, "Exported model repository (metadata.json + clip_*/1/model.pt)."
    )
    triton_url: str = _opt("127.0.0.1:8001", "Triton gRPC address host:port (backend=triton).")
    triton_image_model: str = _opt("clip_image", "Triton model name of the image encoder.")
    triton_text_model: str = _opt("clip_text", "Triton model name of the text encoder.")
    triton_model_version: str = _opt("", "Triton model version ('' = the server's policy).")
    backend_timeout_s: float = _opt(
        30.0, "Longest a backend call may take when the caller set no deadline."
    )
    device: str = _opt("cpu", "Torch device of the embedded backend (cpu, cuda, cuda:1).")
    torch_threads: int = _opt(0, "Intra-op threads of the embedded backend (0 = torch default).")
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
        2048, "Items waiting for the backend before new calls get RESOURCE_EXHAUSTED."
    )
    text_length_buckets: tuple[int, ...] = _opt(
        (8, 16, 24, 32, 48, 77),
        "Token-length bucket edges: a text is padded to the edge of its bucket only.",
    )
    decode_threads: int = _opt(0, "Threads decoding images (0 = number of CPUs).")
    # --- limits
    max_items: int = _opt(256, "Most texts or images in one request.")
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
    exif_transpose: bool = _opt(
        True, "Rotate images by their EXIF orientation before preprocessing."
    )
    # --- cache
    redis_url: str = _opt("", "Redis URL for the shared cache ('' = in-process cache only).")
    cache_ttl_s: int = _opt(7 * 24 * 3600, "Time to live of a Redis cache entry, in seconds.")
    local_cache_items: int = _opt(10_000, "Entries in the in-process LRU (0 disables it).")
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
    tls_cert: Path | None = _opt(None, "PEM certificate chain for TLS on the gRPC port.")
    tls_key: Path | None = _opt(None, "PEM private key for TLS.")
    tls_client_ca: Path | None = _opt(None, "PEM CA bundle; when set, clients need a certificate.")
    log_level: str = _opt("INFO", "Log level.")

    # ---------------------------------------------------------------- helpers
    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def all_api_keys(self) -> frozenset[str]:
        """Keys from --api-keys and --api-keys-file together."""
        keys = {k for k in self.api_keys if k}
        if self.api_keys_file is not None:
            for line in Path(self.api_keys_file).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.add(line)
        return frozenset(keys)

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with secrets hidden, for the start-up log."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value:
                value = "***" if f.name != "api_keys" else f"<{len(value)} keys>"
            out[f.name] = value
        return out

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one `--flag` per field; its default comes from `CLIP_<FIELD>` if set."""
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            env = "CLIP_" + f.name.upper()
            kind = _field_type(f)
            help_text = f"{f.metadata['help']} [env {env}]"
            if kind is bool:
                parser.add_argument(
                    flag,
                    dest=f.name,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
            else:
                parser.add_argument(
                    flag,
                    dest=f.name,
                    default=argparse.SUPPRESS,
                    choices=f.metadata.get("choices"),
                    help=help_text + f" (default: {_show(f.default)})",
                )

    @classmethod
    def from_sources(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Defaults, overridden by `CLIP_*` variables, overridden by flags."""
        environ = os.environ if environ is None else environ
        given = vars(args) if args is not None else {}
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw: Any = None
            if f.name in given:
                raw = given[f.name]
            elif "CLIP_" + f.name.upper() in environ:
                raw = environ["CLIP_" + f.name.upper()]
            if raw is not None:
                values[f.name] = _convert(f, raw)
        return cls(**values)


def _field_type(f: dataclasses.Field[Any]) -> type:
    default = f.default
    if isinstance(default, bool):
        return bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    if isinstance(default, tuple):
        return tuple
    if isinstance(default, Path) or f.name.endswith(("_file", "_cert", "_key", "_ca")):
        return Path
    return str


def _convert(f: dataclasses.Field[Any], raw: Any) -> Any:
    kind = _field_type(f)
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is tuple:
            parts = [p.strip() for p in text.split(",") if p.strip()]
            if f.name == "text_length_buckets":
                return tuple(sorted({int(p) for p in parts}))
            return tuple(parts)
        if kind is Path:
            return Path(text) if text else None
    except ValueError as exc:
        raise SystemExit(f"bad value for {f.name}: {raw!r} ({exc})") from exc
    choices: Sequence[str] | None = f.metadata.get("choices")
    if choices and text not in choices:
        raise SystemExit(f"bad value for {f.name}: {raw!r}; choose one of {', '.join(choices)}")
    return text


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "''"
    return repr(value) if value == "" else str(value)
