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
`_RECREATE_INTERVAL_S`), which connects at the next call. A channel can also die
silently (a node that stopped answering without closing its connections): keepalive
pings find that out, and so does a passed deadline, but only one that nothing else on
that channel answered since, and only once a cheap liveness call on it has gone
unanswered too, so that one slow call does not make everyone reconnect.

**Model identity.** Given the identity the gateway's metadata describes
(`expected_model_id`, `expected_weights_sha256`), no vector is returned until both
model configs on Triton carry the same identity (the `parameters` that `clipsvc
export` stamps). The configs are read again on every `ready()` probe, after the
channel is replaced, after Triton was unreachable, and whenever the channel
reconnects (a watcher follows its connectivity): a restarted Triton may serve another
model, and gRPC reconnects without failing a single call. A result whose connection
changed while it was computed is returned only after the identity was checked again.
A check holds for the channel it ran on only; a mismatch, or anything that makes the
identity uncertain (a model not ready, Triton unreachable), voids the checks of every
channel.

**Replicas.** A target that names several replicas balances calls round robin: each
call goes to the next ready address. `ready()` probes (five calls, about once a
second) therefore run on a probe channel of their own: on the inference channel they
would move its rotation on between two calls, and with two replicas an odd count
between sequential calls sent every call to the same replica. A plain host:port has
no rotation to disturb and keeps one channel for everything.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import grpc
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
    ModelMismatch,
    Overloaded,
)
from service.metrics import Metrics
from service.model.metadata import (
    IMAGE_INPUT,
    IMAGE_MODEL,
    MODEL_ID_PARAMETER,
    OUTPUT,
    TEXT_INPUT,
    TEXT_MODEL,
    WEIGHTS_PARAMETER,
)

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
# Targets that name several replicas (`ipv4:a:p,b:p`, a headless `dns:///name:port`):
# every call goes to the next ready address, so all replicas get work, not the first one
# connected. A plain host:port keeps pick-first: after a restart its channel reconnects on
# the next call instead of failing calls until a reconnect backoff ends.
_MULTI_ADDRESS_SCHEMES = ("dns:", "ipv4:", "ipv6:")
_ROUND_ROBIN = ("grpc.lb_policy_name", "round_robin")
# DNS is resolved again only when a connection fails; a `dns:` target's channel is
# renewed this often so that replicas added by a scale-up get work too.
_DNS_REFRESH_S = 30.0
# Embedding calls are idempotent: one that found its replica gone is tried again (on
# the next address) this many times in all, within the caller's deadline.
_UNAVAILABLE_ATTEMPTS = 3
_RETRY_PAUSE_S = 0.05
# Keepalive: a connection whose pings go unanswered for this long is closed, and the
# channel reconnects; without it a silently dead node holds calls until their deadlines
# (and the connection for the kernel's ~15 minutes of TCP retransmissions).
_KEEPALIVE_TIME_S = 10.0
_KEEPALIVE_TIMEOUT_S = 5.0
# Triton's gRPC server keeps grpc's ping policing (a ping more often than every 5 min
# without data is a strike; the third strike is a GOAWAY "too_many_pings"). Two pings
# per quiet spell stay under it; any request resets the count.
_MAX_PINGS_WITHOUT_DATA = 2
_RECREATE_INTERVAL_S = 0.5
# After a deadline passed with no answer on the channel since the call began, one
# liveness call gets this long before the channel is declared stale.
_LIVENESS_PROBE_S = 1.0
# While Triton serves another model, calls re-read its configs at most this often
# (ready() probes read them every time).
_IDENTITY_RECHECK_S = 1.0
# Reads of the two configs retried when the connection changed during the read.
_IDENTITY_ATTEMPTS = 3
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


@dataclass(frozen=True)
class ServedIdentity:
    """What one model config on Triton says it is (None: the parameter is missing)."""

    model_id: str | None
    weights_sha256: str | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ServedIdentity:
        """Read the export's stamp from a model config (`get_model_config(as_json=True)`)."""
        parameters = config.get("parameters") or {}

        def value(key: str) -> str | None:
            entry = parameters.get(key)
            text = entry.get("string_value") if isinstance(entry, dict) else None
            return str(text) if text else None

        return cls(value(MODEL_ID_PARAMETER), value(WEIGHTS_PARAMETER))

    @property
    def stamped(self) -> bool:
        """Both parameters present (a repository exported with identity stamping)."""
        return self.model_id is not None and self.weights_sha256 is not None

    def satisfies(self, expected: ServedIdentity) -> bool:
        """Equal in every field `expected` names (a None there is not checked)."""
        return all(
            want is None or want == got
            for want, got in (
                (expected.model_id, self.model_id),
                (expected.weights_sha256, self.weights_sha256),
            )
        )

    def describe(self) -> str:
        """`model id (weights sha256 0123456789ab…)`, for messages."""
        weights = (self.weights_sha256 or "?")[:12]
        return f"{self.model_id or '?'} (weights sha256 {weights}…)"


class _Channel:
    """One tritonclient channel and what this backend has seen of it."""

    def __init__(self, client: triton_aio.InferenceServerClient, created: float) -> None:
        self.client = client
        self.created = created
        #: Replace it at the next call (it reported the server unreachable, or hung).
        self.stale = False
        #: time.monotonic() of the latest answer of any kind Triton sent on it.
        self.last_answer = -math.inf
        #: Bumped on every connectivity change: a new connection may reach another server.
        self.epoch = 0
        #: (epoch, identity generation) at which the configs read on it carried the
        #: expected identity; a check is good while both still hold.
        self.verified: tuple[int, int] | None = None
        #: The config read in progress on it, shared by everyone who waits for one.
        self.verifying: asyncio.Task[None] | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.probe: asyncio.Task[None] | None = None


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
        expected_model_id: str | None = None,
        expected_weights_sha256: str | None = None,
        keepalive_time_s: float = _KEEPALIVE_TIME_S,
        keepalive_timeout_s: float = _KEEPALIVE_TIMEOUT_S,
    ) -> None:
        """Prepare (not connect); `max_batch_size` holds until the models' configs are read.

        With `expected_model_id` / `expected_weights_sha256` (the gateway's metadata),
        nothing is served until Triton's model configs carry that identity.
        """
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
        self._keepalive = (keepalive_time_s, keepalive_timeout_s)
        # Several replicas: round robin, and ready() probes on a channel of their own so
        # that only inference moves the inference channel's rotation on.
        self._multi_address = url.startswith(_MULTI_ADDRESS_SCHEMES)
        self._channel: _Channel | None = None
        self._probe_channel: _Channel | None = None  # multi-address targets only
        self._reachable = True  # logged on change only, not on every failed call
        # Retiring channels, liveness calls, watchers, config reads.
        self._tasks: set[asyncio.Task[None]] = set()
        # Identity: what the metadata says; each channel keeps where Triton was last seen
        # serving it (`_Channel.verified`), and a mismatch is kept with where and when it
        # was seen. Voiding every check at once bumps the generation: that reaches
        # channels being retired too, whose calls may still be returning vectors.
        self._expected = (
            ServedIdentity(expected_model_id, expected_weights_sha256)
            if expected_model_id is not None or expected_weights_sha256 is not None
            else None
        )
        self._identity_generation = 0
        self._mismatch: tuple[ModelMismatch, _Channel, int, float] | None = None

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
        channel = self._get_channel()
        try:
            await self._verify(channel)
        except ModelMismatch:
            pass  # logged loudly where it was found; ready() keeps checking
        except ClipError as exc:
            # The gateway may start before Triton; configs are read at the first ready().
            _LOGGER.warning(
                "Triton at %s: model configs not read yet (%s); max_batch_size stays %d",
                self.url, exc, self.max_batch_size,
            )  # fmt: skip

    async def ready(self) -> bool:
        """Server and both models ready, and (with an expected identity) serving that
        model; asked with a short timeout, never raises. Re-reads the model configs.

        With several replicas all of it runs on the probe channel: its calls must not
        move the inference channel's round robin on."""
        channel = self._get_probe_channel()
        client = channel.client
        timeout_s = self.ready_timeout_s
        version = self.model_version
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s + _OUTER_GRACE_S):
                answers = await asyncio.gather(
                    client.is_server_ready(client_timeout=timeout_s),
                    *(
                        client.is_model_ready(m.name, version, client_timeout=timeout_s)
                        for m in self._models.values()
                    ),
                )
            self._answered(channel)
            if not all(answers):
                # Models being (re)loaded: whatever comes back may be another model.
                self._forget_identity()
                return False
            # Every probe: a model reloaded in place shows only in its config.
            await self._verify(channel)
            return True
        except ModelMismatch:
            return False  # logged when it was found
        except Exception as exc:  # a health probe reports, it does not fail
            if isinstance(exc, TimeoutError) or _is_deadline(exc):
                self._deadline_passed(channel, started)
            elif _is_unreachable(exc):
                self._mark_unreachable(str(exc), channel)
            # A model config we cannot serve will not fix itself: say so loudly.
            log = _LOGGER.warning if isinstance(exc, BackendFailure) else _LOGGER.debug
            log("Triton at %s not ready: %s", self.url, exc)
            return False

    async def aclose(self) -> None:
        """Close the channels (and any replaced ones still draining)."""
        channels = self._live_channels()
        self._channel = self._probe_channel = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for channel in channels:
            await channel.client.close()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

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
            for attempt in range(1, _UNAVAILABLE_ATTEMPTS + 1):
                try:
                    out = await self._embed_once(model, rows, deadline)
                    break
                except BackendUnavailable:
                    # A replica died or restarts: the next address (or the restarted
                    # server) may answer within the caller's deadline.
                    remaining_s = deadline - asyncio.get_running_loop().time()
                    if attempt == _UNAVAILABLE_ATTEMPTS or remaining_s <= _RETRY_PAUSE_S:
                        raise
                    await asyncio.sleep(_RETRY_PAUSE_S * attempt)
        except ClipError:
            if self._metrics is not None:
                self._metrics.backend_errors.labels(self.name, modality).inc()
            raise
        if self._metrics is not None:
            self._metrics.backend_latency.labels(self.name, modality).observe(
                time.perf_counter() - started
            )
        return out

    async def _embed_once(
        self, model: _TritonModel, rows: np.ndarray, deadline: float
    ) -> np.ndarray:
        """One try: the identity checked on the current channel, then every chunk."""
        channel = self._get_channel()
        await self._ensure_identity(channel, deadline)
        # Triton refuses a request over its max_batch_size; split it instead (the
        # chunks run concurrently and Triton may batch them back together).
        chunks = split_rows(rows, model.max_batch_size or self.max_batch_size)
        results = await asyncio.gather(
            *(self._infer(channel, model, chunk, deadline) for chunk in chunks),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if self._expected is not None and not self._verified(channel):
            # The connection changed (or a probe found another model) during the
            # call: these vectors may come from a restarted or reloaded Triton.
            # Return them only if it still serves our model.
            await self._ensure_identity(self._get_channel(), deadline)
        embeddings = [r for r in results if isinstance(r, np.ndarray)]
        return embeddings[0] if len(embeddings) == 1 else np.concatenate(embeddings)

    async def _infer(
        self, channel: _Channel, model: _TritonModel, rows: np.ndarray, deadline: float
    ) -> np.ndarray:
        remaining_s = deadline - asyncio.get_running_loop().time()
        if remaining_s <= 0:
            raise DeadlineExceeded(f"the deadline passed before {model.name} was called")
        tensor = InferInput(model.input_name, list(rows.shape), model.datatype)
        tensor.set_data_from_numpy(rows)
        started = time.monotonic()
        try:
            async with asyncio.timeout(remaining_s + _OUTER_GRACE_S):
                result = await channel.client.infer(
                    model.name,
                    [tensor],
                    model_version=self.model_version,
                    outputs=[InferRequestedOutput(model.output_name)],
                    client_timeout=remaining_s,
                    # Triton's queue timeout, in microseconds.
                    timeout=max(1, int(remaining_s * 1e6)),
                )
        except InferenceServerException as exc:
            raise self._call_failed(channel, model, exc, started) from exc
        except TimeoutError as exc:
            self._deadline_passed(channel, started)
            raise DeadlineExceeded(
                f"{model.name} did not answer within {remaining_s:.3f} s"
            ) from exc
        except ClipError:
            raise
        except Exception as exc:  # e.g. grpc.aio.UsageError on a closed channel
            self._mark_unreachable(repr(exc), channel)
            raise BackendUnavailable(f"Triton at {self.url}: {exc!r}") from exc
        self._answered(channel)
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

    def _call_failed(
        self, channel: _Channel, model: _TritonModel, exc: InferenceServerException, started: float
    ) -> ClipError:
        """Map a failed call's error and learn from it what the channel's state is."""
        error = self._map_error(model, exc, channel)
        if isinstance(error, DeadlineExceeded):
            self._deadline_passed(channel, started)
        elif not isinstance(error, BackendUnavailable):
            self._answered(channel)  # Triton itself refused: the channel works
        return error

    def _map_error(
        self, model: _TritonModel, exc: InferenceServerException, channel: _Channel | None = None
    ) -> ClipError:
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
            self._mark_unreachable(message, channel)
            return BackendUnavailable(f"Triton at {self.url} ({model.name}): {message}")
        return BackendFailure(
            f"Triton {model.name}: {code or 'error'}: {message}", source=f"Triton {model.name}"
        )

    # ------------------------------------------------------------------ identity
    async def _ensure_identity(self, channel: _Channel, deadline: float) -> None:
        """Return only when Triton was seen serving the expected model on this very
        connection; raise ModelMismatch (or why it could not be checked) otherwise."""
        if self._expected is None:
            return
        for _ in range(_IDENTITY_ATTEMPTS):
            if self._verified(channel):
                return
            mismatch = self._mismatch
            if mismatch is not None:
                error, where, epoch, seen = mismatch
                if (where, epoch) == (channel, channel.epoch) and (
                    time.monotonic() - seen < _IDENTITY_RECHECK_S
                ):
                    raise error
            remaining_s = deadline - asyncio.get_running_loop().time()
            if remaining_s <= 0:
                raise DeadlineExceeded("the deadline passed before Triton's model was checked")
            try:
                async with asyncio.timeout(remaining_s):
                    await self._verify(channel)
            except TimeoutError as exc:
                raise DeadlineExceeded(
                    f"Triton at {self.url}: the served model was not checked within "
                    f"{remaining_s:.3f} s"
                ) from exc
        if not self._verified(channel):
            raise BackendUnavailable(
                f"Triton at {self.url}: the connection kept changing while the served "
                "model was checked"
            )

    async def _verify(self, channel: _Channel) -> None:
        """Read the configs on `channel` (one read at a time, shared by all who wait,
        each within its own deadline)."""
        task = channel.verifying
        if task is None or task.done():
            # Spawned: aclose() cancels it, even on a channel replaced meanwhile.
            task = channel.verifying = self._spawn(
                self._load_configs(channel, self.ready_timeout_s)
            )
            # A waiter that gives up must not leave the error unretrieved.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(task)

    def _verified(self, channel: _Channel) -> bool:
        """Triton was seen serving the expected model on `channel`'s connection now,
        and nothing since made that uncertain."""
        return channel.verified == (channel.epoch, self._identity_generation)

    def _forget_identity(self) -> None:
        """Every next result needs a fresh check (Triton may be another server now), on
        whichever channel it comes: what a probe found holds for inference too."""
        self._identity_generation += 1

    def _check_identity(
        self, channel: _Channel, epoch: int, generation: int, served: dict[str, ServedIdentity]
    ) -> None:
        """Compare what both configs say (read on `channel` at `epoch`, begun at identity
        `generation`) with the expectation; record and report it."""
        expected = self._expected
        if expected is None:
            return
        wrong = {name: got for name, got in served.items() if not got.satisfies(expected)}
        if not wrong:
            # This channel only: a check on the probe channel says nothing about the
            # connections inference uses. A generation bumped during the read (the
            # identity became uncertain meanwhile) leaves the check void.
            channel.verified = (epoch, generation)
            if self._mismatch is not None:
                _LOGGER.info("Triton at %s serves %s again: serving", self.url, expected.describe())
            self._mismatch = None
            self._set_mismatch_metric(0)
            return
        self._forget_identity()  # a probe that sees another model stops inference too
        names = " and ".join(sorted(wrong))
        sample = next(iter(wrong.values()))
        if not all(got.stamped for got in wrong.values()):
            message = (
                f"Triton at {self.url} serves {names} without the model identity "
                f"({MODEL_ID_PARAMETER}, {WEIGHTS_PARAMETER} in config.pbtxt): the repository "
                "was exported before identity stamping; re-export it with `clipsvc export` "
                f"from the weights this gateway expects, {expected.describe()}"
            )
        elif len({*wrong.values()}) == 1:
            message = (
                f"Triton at {self.url} serves model {sample.describe()} as {names}, but this "
                f"gateway's metadata.json describes model {expected.describe()}: deploy the "
                "gateway and Triton from the same export"
            )
        else:
            each = ", ".join(f"{name} is {got.describe()}" for name, got in sorted(wrong.items()))
            message = (
                f"Triton at {self.url} serves other models ({each}) than this gateway's "
                f"metadata.json describes, {expected.describe()}: deploy the gateway and "
                "Triton from the same export"
            )
        error = ModelMismatch(message)
        previous = self._mismatch
        if previous is None or str(previous[0]) != message:
            _LOGGER.error("refusing to serve: %s", message)
        self._mismatch = (error, channel, epoch, time.monotonic())
        self._set_mismatch_metric(1)
        raise error

    def _set_mismatch_metric(self, value: int) -> None:
        if self._metrics is not None:
            self._metrics.model_mismatch.set(value)

    # ------------------------------------------------------------------ plumbing
    def _get_channel(self) -> _Channel:
        """The channel inference runs on (renewed first when due)."""
        channel = self._channel = self._renewed(self._channel, "inference")
        return channel

    def _get_probe_channel(self) -> _Channel:
        """The channel ready() probes run on: the inference channel for a single
        address, one of their own for several (they would move its rotation on)."""
        if not self._multi_address:
            return self._get_channel()
        channel = self._probe_channel = self._renewed(self._probe_channel, "probe")
        return channel

    def _live_channels(self) -> list[_Channel]:
        """The channels in use (none, one, or the inference and the probe channel)."""
        return [c for c in (self._channel, self._probe_channel) if c is not None]

    def _renewed(self, channel: _Channel | None, role: str) -> _Channel:
        """`channel`, or a new one when there is none, it went stale, or (`dns:`) the
        addresses are due to be resolved again; the old one is retired."""
        now = time.monotonic()
        if channel is None:
            return self._new_channel(now)
        if (channel.stale and now - channel.created >= _RECREATE_INTERVAL_S) or (
            self.url.startswith("dns:") and now - channel.created >= _DNS_REFRESH_S
        ):
            _LOGGER.debug("Triton at %s: replaced the %s gRPC channel", self.url, role)
            self._spawn(self._retire(channel))
            return self._new_channel(now)
        return channel

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _answered(self, channel: _Channel) -> None:
        """Triton answered on `channel` (with anything): it works."""
        channel.last_answer = time.monotonic()
        self._mark_reachable()

    def _deadline_passed(self, channel: _Channel, started: float) -> None:
        """A call begun at `started` on `channel` ran out of time.

        A slow call is no reason to reconnect: only if nothing came back on the
        channel since the call began does one liveness call check it; if that goes
        unanswered too, the channel is stale and the next call gets a fresh one.
        """
        if (
            channel.last_answer >= started
            or all(channel is not live for live in self._live_channels())
            or channel.stale
            or channel.probe is not None
        ):
            return
        channel.probe = self._spawn(self._probe(channel))

    async def _probe(self, channel: _Channel) -> None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(_LIVENESS_PROBE_S + _OUTER_GRACE_S):
                await channel.client.is_server_live(client_timeout=_LIVENESS_PROBE_S)
            self._answered(channel)
        except Exception as exc:
            if channel.last_answer < started:  # nothing at all came back meanwhile
                self._mark_unreachable(
                    f"no answer after a call's deadline passed, nor to a liveness call ({exc!r})",
                    channel,
                )
        finally:
            channel.probe = None

    def _mark_unreachable(self, reason: str, channel: _Channel | None = None) -> None:
        channel = channel or self._channel
        if channel is not None:
            channel.stale = True
        # Whatever answers next may be another server: check its model first.
        self._forget_identity()
        if self._reachable:
            self._reachable = False
            _LOGGER.warning("Triton at %s is unreachable: %s", self.url, reason)

    def _mark_reachable(self) -> None:
        if not self._reachable:
            self._reachable = True
            _LOGGER.info("Triton at %s answers again", self.url)

    def _channel_args(self) -> list[tuple[str, Any]]:
        keepalive_s, timeout_s = self._keepalive
        balance = [_ROUND_ROBIN] if self._multi_address else []
        return [
            *_CHANNEL_ARGS,
            *balance,
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", _MAX_PINGS_WITHOUT_DATA),
            # gRPC sends no keepalive ping while another ping is unanswered (the BDP
            # ping that goes out with a request), and that one waits this long (1 min
            # by default): without it a hung server holds a call for a minute.
            ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
        ]

    def _new_channel(self, now: float) -> _Channel:
        client = triton_aio.InferenceServerClient(self.url, channel_args=self._channel_args())
        channel = _Channel(client, now)
        grpc_channel = getattr(client, "_channel", None)
        if isinstance(grpc_channel, grpc.aio.Channel):
            channel.watcher = self._spawn(_watch_connectivity(channel, grpc_channel))
        return channel

    async def _retire(self, channel: _Channel) -> None:
        # Calls still running on the old channel keep their own deadlines; closing
        # with a grace lets them end on their own instead of being cancelled.
        for task in (channel.watcher, channel.probe):
            if task is not None:
                task.cancel()
        grpc_channel = getattr(channel.client, "_channel", None)
        if grpc_channel is None:
            await channel.client.close()
            return
        try:
            await grpc_channel.close(grace=self.default_timeout_s + _OUTER_GRACE_S)
        except asyncio.CancelledError:
            await grpc_channel.close()  # aclose(): stop waiting for those calls
            raise

    async def _load_configs(self, channel: _Channel, timeout_s: float) -> None:
        """Read both model configs on `channel`; check the identity, then adopt them."""
        names = list(self._models)
        for _ in range(_IDENTITY_ATTEMPTS):
            epoch, generation = channel.epoch, self._identity_generation
            started = time.monotonic()
            try:
                async with asyncio.timeout(timeout_s + _OUTER_GRACE_S):
                    answers = await asyncio.gather(
                        *(
                            channel.client.get_model_config(
                                m.name, self.model_version, as_json=True, client_timeout=timeout_s
                            )
                            for m in self._models.values()
                        )
                    )
            except InferenceServerException as exc:
                raise self._call_failed(
                    channel, next(iter(self._models.values())), exc, started
                ) from exc
            except TimeoutError as exc:
                self._deadline_passed(channel, started)
                raise DeadlineExceeded(f"Triton at {self.url} did not answer in time") from exc
            self._answered(channel)
            if channel.epoch == epoch:
                break  # both answers came over one connection
        else:
            raise BackendUnavailable(
                f"Triton at {self.url}: the connection kept changing while the model "
                "configs were read"
            )
        configs = {
            name: answer.get("config", answer) for name, answer in zip(names, answers, strict=True)
        }
        self._check_identity(
            channel,
            epoch,
            generation,
            {self._models[n].name: ServedIdentity.from_config(c) for n, c in configs.items()},
        )
        before = self._describe_models()
        for name, config in configs.items():
            _apply_config(self._models[name], config)
        sizes = [m.max_batch_size or 0 for m in self._models.values()]
        self.max_batch_size = min(sizes)
        dims = {m.embedding_dim for m in self._models.values()}
        if len(dims) != 1:
            raise BackendFailure(f"the two models disagree on the embedding size: {dims}")
        self.embedding_dim = dims.pop()
        if self._describe_models() != before:  # every ready() reads them: log changes only
            _LOGGER.info("Triton at %s: %s", self.url, self._describe_models())

    def _describe_models(self) -> str:
        return (
            ", ".join(
                f"{m.name} ({m.input_name} {m.datatype}, batch ≤ {m.max_batch_size})"
                for m in self._models.values()
            )
            + f"; max_batch_size {self.max_batch_size}, embedding dim {self.embedding_dim}"
        )


async def _watch_connectivity(channel: _Channel, grpc_channel: grpc.aio.Channel) -> None:
    """Bump `channel.epoch` on every connectivity change, until the channel closes.

    gRPC reconnects by itself: after a Triton restart the next call simply succeeds on
    a new connection, perhaps to a server with another model. The epoch tells.
    """
    try:
        state = grpc_channel.get_state(try_to_connect=False)
        while state != grpc.ChannelConnectivity.SHUTDOWN:
            await grpc_channel.wait_for_state_change(state)
            state = grpc_channel.get_state(try_to_connect=False)
            channel.epoch += 1
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a closed channel: nothing left to watch
        _LOGGER.debug("connectivity watcher ended: %r", exc)


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


def _is_deadline(exc: BaseException) -> bool:
    if isinstance(exc, InferenceServerException):
        return (exc.status() or "").endswith("DEADLINE_EXCEEDED")
    return isinstance(exc, DeadlineExceeded)


def _is_unreachable(exc: BaseException) -> bool:
    if isinstance(exc, InferenceServerException):
        return (exc.status() or "").endswith(("UNAVAILABLE", "CANCELLED"))
    return isinstance(exc, BackendUnavailable)
