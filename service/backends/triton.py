"""The Triton backend: both encoders behind a Triton Inference Server, over gRPC.

Triton does the batching (its dynamic batcher merges concurrent requests), so each
call here is one `ModelInfer` per chunk of at most the model's `max_batch_size`.
Every call is bounded twice: by the gRPC deadline (`client_timeout`) and by Triton's
own queue timeout (the request's `timeout`, allowed by the configs'
`allow_timeout_override`), so work is not left waiting in Triton's queue after the
caller has given up.

Errors become `service.errors` types. After Triton restarts, the gRPC channel may sit
in reconnect backoff and fail calls for a while; a channel that reported the server
unreachable is therefore replaced by a fresh one (at most every
`_RECREATE_INTERVAL_S`), which connects at the next call.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from service.backends.base import split_rows
from service.errors import (
    BackendFailure,
    BackendUnavailable,
    ClipError,
    DeadlineExceeded,
    Overloaded,
)
from service.metrics import Metrics
from service.model.metadata import IMAGE_INPUT, IMAGE_MODEL, OUTPUT, TEXT_INPUT, TEXT_MODEL

_LOGGER = logging.getLogger(__name__)

_MAX_MESSAGE_BYTES = 2**31 - 1
# Without these, gRPC's reconnect backoff grows to 120 s: after a Triton restart the
# channel would keep failing calls long after the server is back.
_CHANNEL_ARGS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_RECREATE_INTERVAL_S = 0.5
# The asyncio bound behind the gRPC deadline, in case the deadline itself is lost.
_OUTER_GRACE_S = 1.0
_READY_TIMEOUT_S = 2.0
_REQUEST_ID = re.compile(r"^\[request id: [^\]]*\]\s*")
# Triton's own words (core/src/dynamic_batch_scheduler.cc, 2.41) for the two ways its
# queue turns a request away; both arrive as gRPC UNAVAILABLE.
_QUEUE_FULL = "Exceeds maximum queue size"
_QUEUE_TIMEOUT = "Request timeout expired"


@dataclass
class _TritonModel:
    """What a call needs to know about one Triton model; refined from its config."""

    name: str
    input_name: str
    datatype: str
    output_name: str = OUTPUT
    max_batch_size: int | None = None
    embedding_dim: int | None = None

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(triton_to_np_dtype(self.datatype))


class TritonBackend:
    """Runs the two encoders on a Triton server through `tritonclient.grpc.aio`."""

    #: Metrics label and GetModelInfo value.
    name: str = "triton"

    def __init__(
        self,
        *,
        url: str,
        default_timeout_s: float,
        max_batch_size: int,
        image_model: str = IMAGE_MODEL,
        text_model: str = TEXT_MODEL,
        model_version: str = "",
        metrics: Metrics | None = None,
        ready_timeout_s: float = _READY_TIMEOUT_S,
    ) -> None:
        """Prepare (not connect); `max_batch_size` holds until the models' configs are read."""
        self.url = url
        self.model_version = model_version
        self.default_timeout_s = default_timeout_s
        self.ready_timeout_s = ready_timeout_s
        #: Most items one call may carry: the smaller `max_batch_size` of the two models.
        self.max_batch_size = max_batch_size
        #: Length of an embedding, known once a model config has been read.
        self.embedding_dim: int | None = None
        self._metrics = metrics
        self._models = {
            "image": _TritonModel(image_model, IMAGE_INPUT, "UINT8"),
            "text": _TritonModel(text_model, TEXT_INPUT, "INT64"),
        }
        self._configured = False
        self._client: triton_aio.InferenceServerClient | None = None
        self._client_created = 0.0
        self._stale = False
        self._reachable = True  # logged on change only, not on every failed call
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def image_model(self) -> str:
        """Triton model name of the image encoder."""
        return self._models["image"].name

    @property
    def text_model(self) -> str:
        """Triton model name of the text encoder."""
        return self._models["text"].name

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the channel and read both model configs; Triton may still be down."""
        self._get_client()
        try:
            await self._load_configs(self.ready_timeout_s)
        except ClipError as exc:
            # The gateway may start before Triton; configs are read at the first ready().
            _LOGGER.warning(
                "Triton at %s: model configs not read yet (%s); max_batch_size stays %d",
                self.url, exc, self.max_batch_size,
            )  # fmt: skip

    async def ready(self) -> bool:
        """Server ready and both models ready, asked with a short timeout; never raises."""
        client = self._get_client()
        timeout_s = self.ready_timeout_s
        version = self.model_version
        try:
            async with asyncio.timeout(timeout_s + _OUTER_GRACE_S):
                answers = await asyncio.gather(
                    client.is_server_ready(client_timeout=timeout_s),
                    *(
                        client.is_model_ready(m.name, version, client_timeout=timeout_s)
                        for m in self._models.values()
                    ),
                )
                self._mark_reachable()
                if not all(answers):
                    return False
                if not self._configured:
                    await self._load_configs(timeout_s)
                return True
        except Exception as exc:  # a health probe reports, it does not fail
            if _is_unreachable(exc):
                self._mark_unreachable(str(exc))
            # A model config we cannot serve will not fix itself: say so loudly.
            log = _LOGGER.warning if isinstance(exc, BackendFailure) else _LOGGER.debug
            log("Triton at %s not ready: %s", self.url, exc)
            return False

    async def aclose(self) -> None:
        """Close the channel (and any replaced ones still draining)."""
        client, self._client = self._client, None
        for task in list(self._retiring):
            task.cancel()
        if client is not None:
            await client.close()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    # ------------------------------------------------------------------ inference
    async def embed_images(
        self, pixels_uint8: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """`uint8 [B,3,S,S]` → L2-normalized `float32 [B,D]`."""
        return await self._embed("image", pixels_uint8, timeout_s)

    async def embed_texts(
        self, token_ids: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """`int64 [B,L]` (L ≤ context length, end-of-text inside) → `float32 [B,D]`."""
        return await self._embed("text", token_ids, timeout_s)

    async def _embed(self, modality: str, rows: np.ndarray, timeout_s: float | None) -> np.ndarray:
        model = self._models[modality]
        budget_s = self.default_timeout_s if timeout_s is None else timeout_s
        started = time.perf_counter()
        try:
            rows = self._check_rows(model, rows)
            if rows.shape[0] == 0:
                return np.zeros((0, self.embedding_dim or 0), dtype=np.float32)
            if budget_s <= 0:
                raise DeadlineExceeded("the deadline passed before the Triton call")
            deadline = asyncio.get_running_loop().time() + budget_s
            # Triton refuses a request over its max_batch_size; split it instead (the
            # chunks run concurrently and Triton may batch them back together).
            chunks = split_rows(rows, model.max_batch_size or self.max_batch_size)
            results = await asyncio.gather(
                *(self._infer(model, chunk, deadline) for chunk in chunks),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            embeddings = [r for r in results if isinstance(r, np.ndarray)]
            out = embeddings[0] if len(embeddings) == 1 else np.concatenate(embeddings)
        except ClipError:
            if self._metrics is not None:
                self._metrics.backend_errors.labels(self.name, modality).inc()
            raise
        if self._metrics is not None:
            self._metrics.backend_latency.labels(self.name, modality).observe(
                time.perf_counter() - started
            )
        return out

    async def _infer(self, model: _TritonModel, rows: np.ndarray, deadline: float) -> np.ndarray:
        remaining_s = deadline - asyncio.get_running_loop().time()
        if remaining_s <= 0:
            raise DeadlineExceeded(f"the deadline passed before {model.name} was called")
        client = self._get_client()
        tensor = InferInput(model.input_name, list(rows.shape), model.datatype)
        tensor.set_data_from_numpy(rows)
        try:
            async with asyncio.timeout(remaining_s + _OUTER_GRACE_S):
                result = await client.infer(
                    model.name,
                    [tensor],
                    model_version=self.model_version,
                    outputs=[InferRequestedOutput(model.output_name)],
                    client_timeout=remaining_s,
                    # Triton's queue timeout, in microseconds.
                    timeout=max(1, int(remaining_s * 1e6)),
                )
        except InferenceServerException as exc:
            raise self._map_error(model, exc) from exc
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"{model.name} did not answer within {remaining_s:.3f} s"
            ) from exc
        except ClipError:
            raise
        except Exception as exc:  # e.g. grpc.aio.UsageError on a closed channel
            self._mark_unreachable(repr(exc))
            raise BackendUnavailable(f"Triton at {self.url}: {exc!r}") from exc
        self._mark_reachable()
        embeddings = result.as_numpy(model.output_name)
        if embeddings is None or embeddings.ndim != 2 or embeddings.shape[0] != rows.shape[0]:
            shape = None if embeddings is None else embeddings.shape
            raise BackendFailure(
                f"{model.name} answered {shape} for {rows.shape[0]} inputs "
                f"(output {model.output_name!r})"
            )
        # as_numpy() is a read-only view of the response buffer; callers may write.
        return np.array(embeddings, dtype=np.float32)

    def _check_rows(self, model: _TritonModel, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.ndim < 2:
            raise BackendFailure(f"{model.name} needs a batch [B, ...], got shape {rows.shape}")
        want = model.numpy_dtype
        if rows.dtype != want:
            # Widening (int32 token ids → int64) is lossless; anything else is a bug.
            if not np.can_cast(rows.dtype, want, casting="safe"):
                raise BackendFailure(f"{model.name} takes {want}, got {rows.dtype}")
            rows = rows.astype(want)
        return np.ascontiguousarray(rows)

    def _map_error(self, model: _TritonModel, exc: InferenceServerException) -> ClipError:
        message = _REQUEST_ID.sub("", exc.message() or str(exc))
        code = (exc.status() or "").removeprefix("StatusCode.")
        if _QUEUE_FULL in message:
            return Overloaded(f"Triton's queue for {model.name} is full ({message})")
        if _QUEUE_TIMEOUT in message:
            return Overloaded(f"{model.name} waited in Triton's queue past its timeout ({message})")
        if code == "DEADLINE_EXCEEDED":
            return DeadlineExceeded(f"{model.name} did not answer in time ({message})")
        if code == "RESOURCE_EXHAUSTED":
            return Overloaded(f"Triton refused {model.name}: {message}")
        if code in ("UNAVAILABLE", "CANCELLED", "NOT_FOUND"):
            # NOT_FOUND: the model is not loaded (failed, or being reloaded).
            self._mark_unreachable(message)
            return BackendUnavailable(f"Triton at {self.url} ({model.name}): {message}")
        return BackendFailure(f"Triton {model.name}: {code or 'error'}: {message}")

    # ------------------------------------------------------------------ plumbing
    def _get_client(self) -> triton_aio.InferenceServerClient:
        now = time.monotonic()
        if self._client is None:
            self._client = self._new_client(now)
        elif self._stale and now - self._client_created >= _RECREATE_INTERVAL_S:
            old, self._client = self._client, self._new_client(now)
            _LOGGER.debug("Triton at %s: replaced the gRPC channel", self.url)
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return self._client

    def _mark_unreachable(self, reason: str) -> None:
        self._stale = True
        if self._reachable:
            self._reachable = False
            _LOGGER.warning("Triton at %s is unreachable: %s", self.url, reason)

    def _mark_reachable(self) -> None:
        if not self._reachable:
            self._reachable = True
            _LOGGER.info("Triton at %s answers again", self.url)

    def _new_client(self, now: float) -> triton_aio.InferenceServerClient:
        self._stale = False
        self._client_created = now
        return triton_aio.InferenceServerClient(self.url, channel_args=list(_CHANNEL_ARGS))

    async def _retire(self, client: triton_aio.InferenceServerClient) -> None:
        # Calls still running on the old channel keep their own deadlines; closing
        # with a grace lets them end on their own instead of being cancelled.
        channel = getattr(client, "_channel", None)
        if channel is None:
            await client.close()
            return
        try:
            await channel.close(grace=self.default_timeout_s + _OUTER_GRACE_S)
        except asyncio.CancelledError:
            await channel.close()  # aclose(): stop waiting for those calls
            raise

    async def _load_configs(self, timeout_s: float) -> None:
        client = self._get_client()
        try:
            async with asyncio.timeout(timeout_s + _OUTER_GRACE_S):
                answers = await asyncio.gather(
                    *(
                        client.get_model_config(
                            m.name, self.model_version, as_json=True, client_timeout=timeout_s
                        )
                        for m in self._models.values()
                    )
                )
        except InferenceServerException as exc:
            raise self._map_error(next(iter(self._models.values())), exc) from exc
        except TimeoutError as exc:
            raise DeadlineExceeded(f"Triton at {self.url} did not answer in time") from exc
        for model, answer in zip(self._models.values(), answers, strict=True):
            _apply_config(model, answer.get("config", answer))
        sizes = [m.max_batch_size or 0 for m in self._models.values()]
        self.max_batch_size = min(sizes)
        dims = {m.embedding_dim for m in self._models.values()}
        if len(dims) != 1:
            raise BackendFailure(f"the two models disagree on the embedding size: {dims}")
        self.embedding_dim = dims.pop()
        self._configured = True
        _LOGGER.info(
            "Triton at %s: %s; max_batch_size %d, embedding dim %s",
            self.url,
            ", ".join(
                f"{m.name} ({m.input_name} {m.datatype}, batch ≤ {m.max_batch_size})"
                for m in self._models.values()
            ),
            self.max_batch_size,
            self.embedding_dim,
        )


def _apply_config(model: _TritonModel, config: dict[str, Any]) -> None:
    """Take tensor names, dtype, batch limit and output size from a model's config."""
    max_batch = int(config.get("max_batch_size", 0))
    if max_batch <= 0:
        raise BackendFailure(
            f"{model.name} has max_batch_size {max_batch}: it must batch (dims without B)"
        )
    inputs, outputs = config.get("input", []), config.get("output", [])
    if len(inputs) != 1 or len(outputs) != 1:
        raise BackendFailure(f"{model.name} must have one input and one output")
    model.max_batch_size = max_batch
    model.input_name = inputs[0]["name"]
    model.datatype = str(inputs[0]["data_type"]).removeprefix("TYPE_")
    model.output_name = outputs[0]["name"]
    model.embedding_dim = int(outputs[0]["dims"][-1])


def _is_unreachable(exc: BaseException) -> bool:
    if isinstance(exc, InferenceServerException):
        return (exc.status() or "").endswith(("UNAVAILABLE", "CANCELLED"))
    return isinstance(exc, BackendUnavailable)
