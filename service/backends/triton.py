"""The Triton backend: both encoders behind one or more Triton Inference Servers, over gRPC.

Triton does the batching (its dynamic batcher merges concurrent requests), so each
call here is one `ModelInfer` per chunk of at most the model's `max_batch_size`.
Every call is bounded twice: by the gRPC deadline (`client_timeout`) and by Triton's
own queue timeout (the request's `timeout`, allowed by the configs'
`allow_timeout_override`), so work is not left waiting in Triton's queue after the
caller has given up.

**Replicas.** The target's addresses are resolved here, not by gRPC's balancer:
`ipv4:a:p,b:p` and `ipv6:[a]:p,[b]:p` name them, a `dns:` name is looked up again every
`_DNS_REFRESH_S` (a headless Service's addresses change with scale-ups), and a plain
host:port is one replica. Each address gets a channel of its own, with its own
identity check, readiness and health, and each call goes to the next replica (round
robin) that is verified and serving. gRPC's `round_robin` over the whole set could not
promise that: it picks among addresses nobody checked.

**Model identity, per replica.** Given the identity the gateway's metadata describes
(`expected_model_id`, `expected_weights_sha256`), no inference is sent to an address
until both model configs read on that address's own connection carry that identity
(the `parameters` that `clipsvc export` stamps). An address whose configs say
otherwise is left out (and re-read at most every `_IDENTITY_RECHECK_S`); while no
address serves the expected model, calls fail with ModelMismatch. The check is read
again on every `ready()` probe, after the address was unreachable, and whenever its
channel reconnects (a watcher follows its connectivity): a restarted Triton may serve
another model, and gRPC reconnects without failing a single call. A result whose
connection changed while it was computed is returned only after that address was
checked again; otherwise it is dropped and the call goes to another replica.

**Drains.** Embedding is idempotent: a call that finds its replica gone (UNAVAILABLE,
the connection closed mid-call, a model unloading, Triton saying it is not ready) is
tried again on another verified replica within the caller's deadline, and that replica
gets no new calls until a probe finds it ready and verified again. Triton's readiness
turns false as soon as it gets SIGTERM, so a draining replica is left out from the next
probe on (`ready()`, about once a second from the gateway's health loop), and calls
cost nothing while it finishes what it has. Probes run on the replica's own channel:
the rotation is ours and moves only when a call is placed, so probes cannot shift it
(with gRPC's balancer they once sent every sequential call to the same replica), and a
probe's identity check holds for the very connection inference uses.

Errors become `service.errors` types. After Triton restarts, a gRPC channel may sit in
reconnect backoff and fail calls for a while; a channel that reported its server
unreachable is therefore replaced by a fresh one (at most every
`_RECREATE_INTERVAL_S`), which connects at the next call. A channel can also die
silently (a node that stopped answering without closing its connections): keepalive
pings find that out, and so does a passed deadline, but only one that nothing else on
that channel answered since, and only once a cheap liveness call on it has gone
unanswered too, so that one slow call does not make everyone reconnect.

**Shared memory** (`shared_memory_slots` > 0, `--triton-shared-memory`). Image batches
go to Triton through a region in /dev/shm (`service.backends.shared_memory`) instead of
as gRPC bytes: the gateway writes a batch into a free slot and sends the slot's place.
Only a Triton on the same host (or in the same pod, sharing /dev/shm) can map it. The
region is registered on each connection (again after a reconnect: a restarted Triton
forgot it); a replica that refuses it gets bytes, and so does a call when every slot
is taken or while a registration is under way. A call whose region Triton no longer
knows is sent again as bytes at once. Text token ids are small and always go as bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from service.backends.base import CALL_PRIORITY, split_rows, trace_headers
from service.backends.shared_memory import SlotRegion
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
    # Each channel its own connections: by default gRPC shares one subchannel per
    # address across channels, so the fresh channel that replaces a failed replica's
    # would inherit the old one's reconnect back-off and be refused for up to 2 s
    # after the replica is back.
    ("grpc.use_local_subchannel_pool", 1),
]
# gRPC's default port when a target names none (its own rule for dns:/ipv4:/ipv6:).
_GRPC_DEFAULT_PORT = 443
# A `dns:` target's name is looked up again this often, so that replicas added by a
# scale-up get work and removed ones are let go (gRPC itself re-resolves only when a
# connection fails).
_DNS_REFRESH_S = 30.0
# Embedding calls are idempotent: one that found its replica gone is tried again (on
# another verified replica when there is one) this many times in all, within the
# caller's deadline.
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
# Numbers the shared-memory regions of this process.
_REGION_NUMBERS = itertools.count()
# Registering the shared-memory region: a quick control call, apart from any deadline.
_SHM_CALL_S = 5.0
# What Triton says of a request whose shared-memory region it does not know (lowercased).
_SHARED_MEMORY = "shared memory"
# Registration errors that say nothing about whether Triton can map the region.
_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")
# After a deadline passed with no answer on the channel since the call began, one
# liveness call gets this long before the channel is declared stale.
_LIVENESS_PROBE_S = 1.0
# A replica that is not verified and serving is probed in the background (readiness,
# then its configs) at most this often, so that it rejoins without waiting for the
# gateway's health loop; one that serves another model is re-read at most this often.
_IDENTITY_RECHECK_S = 1.0
# Reads of the two configs retried when the connection changed during the read.
_IDENTITY_ATTEMPTS = 3
# The asyncio bound behind the gRPC deadline, in case the deadline itself is lost.
_OUTER_GRACE_S = 1.0
_READY_TIMEOUT_S = 2.0
_REQUEST_ID = re.compile(r"^\[request id: [^\]]*\]\s*")
# Triton's own words (core/src/dynamic_batch_scheduler.cc, 2.41-2.43) for the two ways its
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


@dataclass(frozen=True)
class Target:
    """Where the replicas are: a fixed list of addresses, or a name to look up."""

    #: Addresses as gRPC dials them (`host:port`, `[v6]:port`); empty for a `dns:` name.
    addresses: tuple[str, ...] = ()
    #: (host, port) of a `dns:` target, looked up again every `_DNS_REFRESH_S`.
    dns: tuple[str, int] | None = None

    @classmethod
    def parse(cls, url: str) -> Target:
        """`ipv4:a:p,b:p`, `ipv6:[a]:p,...`, `dns:[//authority/]name[:port]`, or one
        plain target (host:port, anything else gRPC dials) as a single replica."""
        scheme, _, rest = url.partition(":")
        if scheme in ("ipv4", "ipv6"):
            addresses = tuple(a.strip() for a in rest.split(",") if a.strip())
            if not addresses:
                raise ValueError(f"Triton target {url!r} names no address")
            return cls(addresses=addresses)
        if scheme == "dns":
            name = rest
            if name.startswith("//"):  # dns://authority/name: the authority is not used
                name = name[2:].partition("/")[2]
            host, port = _split_host_port(name)
            if not host:
                raise ValueError(f"Triton target {url!r} names no host")
            return cls(dns=(host, port))
        return cls(addresses=(url,))


def _split_host_port(text: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, `host` → (host, port); gRPC's default port if none."""
    if text.startswith("["):
        host, _, after = text[1:].partition("]")
        port = after.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    return host, int(port) if port else _GRPC_DEFAULT_PORT


async def _lookup(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, as gRPC dials them, in the resolver's order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for family, _, _, _, sockaddr in infos:
        ip, bound = str(sockaddr[0]), int(sockaddr[1])
        address = f"[{ip}]:{bound}" if family == socket.AF_INET6 else f"{ip}:{bound}"
        if address not in addresses:
            addresses.append(address)
    return addresses


class _Channel:
    """One tritonclient channel to one address and what this backend has seen of it."""

    def __init__(self, client: triton_aio.InferenceServerClient, created: float) -> None:
        self.client = client
        self.created = created
        #: Replace it at the next call (it reported the server unreachable, or hung).
        self.stale = False
        #: time.monotonic() of the latest answer of any kind Triton sent on it.
        self.last_answer = -math.inf
        #: Bumped on every connectivity change: a new connection may reach another server.
        self.epoch = 0
        #: Bumped when its check is voided (the identity became uncertain).
        self.generation = 0
        #: (epoch, generation) at which the configs read on it carried the expected
        #: identity; the check is good while both still hold.
        self.verified: tuple[int, int] | None = None
        #: The config read in progress on it, shared by everyone who waits for one.
        self.verifying: asyncio.Task[None] | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.probe: asyncio.Task[None] | None = None
        #: The epoch on which the shared-memory region was registered on it (None: not
        #: registered on this connection), the registration under way, and whether the
        #: server refused to map it (it runs on another host: bytes from then on).
        self.shm_epoch: int | None = None
        self.shm_registering: asyncio.Task[None] | None = None
        self.shm_refused = False


class _Replica:
    """One Triton address: its channel, whether it takes calls, what it was seen serving."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel: _Channel | None = None
        #: False while it said it is not ready (draining, loading) or a call found it
        #: gone; a probe that finds it ready and verified sets it again.
        self.serving = True
        #: The mismatch its configs showed: (error, channel, epoch, when).
        self.mismatch: tuple[ModelMismatch, _Channel, int, float] | None = None
        self.reachable = True  # logged on change only, not on every failed call
        #: The readiness-and-identity probe in progress, shared by all who wait for one.
        self.checking: asyncio.Task[bool] | None = None
        self.last_checked = -math.inf

    def __repr__(self) -> str:
        return f"<replica {self.address}>"


class TritonBackend:
    """Runs the two encoders on Triton replicas through `tritonclient.grpc.aio`."""

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
        shared_memory_slots: int = 0,
    ) -> None:
        """Prepare (not connect); `max_batch_size` holds until the models' configs are read.

        With `expected_model_id` / `expected_weights_sha256` (the gateway's metadata),
        no replica gets inference until its model configs carry that identity. With
        `shared_memory_slots`, that many image batches at once go through /dev/shm.
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
        self._target = Target.parse(url)
        #: The replicas by address, in the target's (or the resolver's) order.
        self._replicas: dict[str, _Replica] = {a: _Replica(a) for a in self._target.addresses}
        self._resolved_at = -math.inf
        self._resolving: asyncio.Task[None] | None = None
        self._rotation = 0  # moved on by placing a call, and by nothing else
        # Retiring channels, liveness calls, watchers, config reads, probes.
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expected = (
            ServedIdentity(expected_model_id, expected_weights_sha256)
            if expected_model_id is not None or expected_weights_sha256 is not None
            else None
        )
        self._shm_slots = shared_memory_slots
        self._shm_wanted = shared_memory_slots > 0  # batches are counted by transport
        #: Made at the first image call (its slot size needs the model's input shape).
        self._shm: SlotRegion | None = None

    @property
    def image_model(self) -> str:
        """Triton model name of the image encoder."""
        return self._models["image"].name

    @property
    def text_model(self) -> str:
        """Triton model name of the text encoder."""
        return self._models["text"].name

    def replica_states(self) -> dict[str, str]:
        """Each replica's state now (`serving`, `unverified`, `mismatch`, `out`), by address."""
        states = {}
        for address, replica in self._replicas.items():
            channel = replica.channel
            if replica.mismatch is not None:
                states[address] = "mismatch"
            elif not replica.serving:
                states[address] = "out"
            elif channel is None or not self._verified(channel):
                states[address] = "unverified"
            else:
                states[address] = "serving"
        return states

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Resolve the target, open a channel per replica and check each one's model;
        Triton may still be down."""
        replicas = await self._current_replicas()
        outcomes = await asyncio.gather(
            *(self._verify(r, self._channel_of(r)) for r in replicas), return_exceptions=True
        )
        self._update_mismatch_metric()
        failures = [o for o in outcomes if isinstance(o, ClipError)]
        if not replicas or (
            failures
            and len(failures) == len(outcomes)
            and not all(isinstance(f, ModelMismatch) for f in failures)
        ):
            # The gateway may start before Triton; configs are read at the first ready().
            why = failures[0] if failures else "no address resolved"
            _LOGGER.warning(
                "Triton at %s: model configs not read yet (%s); max_batch_size stays %d",
                self.url, why, self.max_batch_size,
            )  # fmt: skip

    async def ready(self) -> bool:
        """Some replica is ready, with both models ready, and (with an expected
        identity) serving that model; asked with a short timeout, never raises.

        Probes every replica (readiness, then its model configs, on its own channel):
        what each answers decides whether it gets calls."""
        try:
            replicas = await self._current_replicas()
            results = await asyncio.gather(*(self._check(r) for r in replicas))
        except Exception as exc:  # a health probe reports, it does not fail
            _LOGGER.debug("Triton at %s not ready: %s", self.url, exc)
            return False
        finally:
            self._update_mismatch_metric()
        return any(results)

    async def aclose(self) -> None:
        """Close the channels (and any replaced ones still draining)."""
        channels = [r.channel for r in self._replicas.values() if r.channel is not None]
        for replica in self._replicas.values():
            replica.channel = None
        if self._shm is not None:
            await asyncio.gather(*(self._unregister_shm(c) for c in channels))
            self._shm.close()
            self._shm = None
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
            out = await self._embed_on_some_replica(model, rows, budget_s)
        except ClipError:
            if self._metrics is not None:
                self._metrics.backend_errors.labels(self.name, modality).inc()
            raise
        if self._metrics is not None:
            self._metrics.backend_latency.labels(self.name, modality).observe(
                time.perf_counter() - started
            )
        return out

    async def _embed_on_some_replica(
        self, model: _TritonModel, rows: np.ndarray, budget_s: float
    ) -> np.ndarray:
        """Place the call on a verified, serving replica; one that turns out gone (or
        to serve another model now) is left out and the call goes to another."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        tried: set[_Replica] = set()
        last_error: ClipError | None = None
        failures = 0
        while True:
            replica = await self._pick(tried, deadline, last_error)
            try:
                return await self._embed_on(replica, model, rows, deadline)
            except ModelMismatch as exc:
                # It changed what it serves during the call: its vectors were dropped.
                tried.add(replica)
                last_error = exc
            except BackendUnavailable as exc:
                # It died, drains or restarts: another replica (or, with none left, the
                # restarted server) may answer within the caller's deadline.
                failures += 1
                tried.add(replica)
                last_error = exc
                remaining_s = deadline - loop.time()
                if failures >= _UNAVAILABLE_ATTEMPTS or remaining_s <= _RETRY_PAUSE_S:
                    raise
                if all(r in tried for r in self._replicas.values()):
                    tried.clear()  # every one failed once: the same ones again, after a pause
                    await asyncio.sleep(_RETRY_PAUSE_S * failures)

    async def _pick(
        self, tried: set[_Replica], deadline: float, last_error: ClipError | None
    ) -> _Replica:
        """The next replica (round robin) that is verified and serving; when there is
        none, one checked now; raise why none can take the call."""
        replicas = await self._current_replicas()
        self._probe_the_others(replicas)
        candidates = [r for r in replicas if r not in tried]
        usable = [r for r in candidates if r.serving and self._verified(self._channel_of(r))]
        if usable:
            replica = usable[self._rotation % len(usable)]
            self._rotation += 1
            return replica
        # None proven now: check the others on the spot, those not known out first.
        errors: list[ClipError] = []
        for replica in sorted(candidates, key=lambda r: not r.serving):
            try:
                await self._ensure_identity(replica, deadline)
            except (ModelMismatch, BackendUnavailable, BackendFailure) as exc:
                errors.append(exc)
                continue
            self._rotation += 1
            return replica
        if last_error is not None:
            errors.insert(0, last_error)
        if not errors:
            raise BackendUnavailable(f"Triton at {self.url}: no address resolved")
        mismatches = [e for e in errors if isinstance(e, ModelMismatch)]
        if len(mismatches) == len(errors):
            raise mismatches[-1]
        raise next(e for e in errors if not isinstance(e, ModelMismatch))

    async def _embed_on(
        self, replica: _Replica, model: _TritonModel, rows: np.ndarray, deadline: float
    ) -> np.ndarray:
        """One try on `replica`, whose identity is checked: every chunk."""
        channel = self._channel_of(replica)
        # Triton refuses a request over its max_batch_size; split it instead (the
        # chunks run concurrently and Triton may batch them back together).
        chunks = split_rows(rows, model.max_batch_size or self.max_batch_size)
        results = await asyncio.gather(
            *(self._infer(replica, channel, model, chunk, deadline) for chunk in chunks),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if not self._verified(channel):
            # The connection changed (or a probe voided the check) during the call:
            # these vectors may come from a restarted or reloaded Triton. Return them
            # only if it still serves our model.
            await self._ensure_identity(replica, deadline)
        embeddings = [r for r in results if isinstance(r, np.ndarray)]
        return embeddings[0] if len(embeddings) == 1 else np.concatenate(embeddings)

    async def _infer(
        self,
        replica: _Replica,
        channel: _Channel,
        model: _TritonModel,
        rows: np.ndarray,
        deadline: float,
    ) -> np.ndarray:
        remaining_s = deadline - asyncio.get_running_loop().time()
        if remaining_s <= 0:
            raise DeadlineExceeded(f"the deadline passed before {model.name} was called")
        tensor = InferInput(model.input_name, list(rows.shape), model.datatype)
        slot = self._shm_slot(channel, model, rows)
        if slot is None:
            tensor.set_data_from_numpy(rows)
        else:
            assert self._shm is not None
            tensor.set_shared_memory(self._shm.name, rows.nbytes, slot)
        resent = False
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
                    # The batch's lane as a priority level (0: the model's default).
                    priority=CALL_PRIORITY.get(),
                    # The batch's trace context as `traceparent` (none when not tracing).
                    headers=trace_headers(),
                )
        except InferenceServerException as exc:
            if slot is not None and _SHARED_MEMORY in (exc.message() or "").lower():
                # It does not know the region (it restarted and the reconnect was not
                # seen yet): register again later, send these as bytes now.
                channel.shm_epoch = None
                resent = True  # counted once, as the bytes it went as
                return await self._infer(replica, channel, model, rows, deadline)
            raise self._call_failed(replica, channel, model, exc, started) from exc
        except TimeoutError as exc:
            self._deadline_passed(replica, channel, started)
            raise DeadlineExceeded(
                f"{model.name} did not answer within {remaining_s:.3f} s"
            ) from exc
        except ClipError:
            raise
        except Exception as exc:  # e.g. grpc.aio.UsageError on a closed channel
            self._mark_unreachable(replica, repr(exc), channel)
            raise BackendUnavailable(f"Triton at {replica.address}: {exc!r}") from exc
        finally:
            if slot is not None and self._shm is not None:
                self._shm.give_back(slot)
            if not resent:
                self._count_transport(model, slot)
        self._answered(replica, channel)
        embeddings = result.as_numpy(model.output_name)
        if embeddings is None or embeddings.ndim != 2 or embeddings.shape[0] != rows.shape[0]:
            shape = None if embeddings is None else embeddings.shape
            raise BackendFailure(
                f"{model.name} answered {shape} for {rows.shape[0]} inputs "
                f"(output {model.output_name!r})"
            )
        # as_numpy() is a read-only view of the response buffer; callers may write.
        return np.array(embeddings, dtype=np.float32)

    # ------------------------------------------------------------------ shared memory
    def _shm_slot(self, channel: _Channel, model: _TritonModel, rows: np.ndarray) -> int | None:
        """The slot `rows` were copied into, or None: send them as bytes (text, no slot
        free, the region not registered on this connection yet, or refused there)."""
        if not self._shm_slots or model is not self._models["image"] or channel.shm_refused:
            return None
        if self._shm is None:
            # Unique in this process (two gateways in one process, tests do that, must
            # not share slots), the same after a restart (so the old file is taken over).
            number = next(_REGION_NUMBERS)
            name = f"clip_{socket.gethostname()}_{os.getpid()}_{number}_{model.name}"
            size = rows[0].nbytes * (model.max_batch_size or self.max_batch_size)
            try:
                self._shm = SlotRegion(name, size, self._shm_slots)
            except OSError as exc:
                _LOGGER.warning(
                    "no shared memory for image batches (%s: %d × %d bytes: %s); they go to "
                    "Triton as gRPC bytes",
                    name,
                    self._shm_slots,
                    size,
                    exc,
                )
                self._shm_slots = 0  # for good: bytes, as without the flag
                return None
            if self._metrics is not None:
                region = self._shm
                self._metrics.triton_shared_memory_slots_free.set_function(
                    lambda: region.free_slots
                )
        if channel.shm_epoch != channel.epoch:
            # Not waited for: calls go as bytes until Triton has mapped the region.
            if channel.shm_registering is None:
                channel.shm_registering = self._spawn(self._register_shm(channel))
            return None
        return self._shm.take(rows)

    async def _register_shm(self, channel: _Channel) -> None:
        assert self._shm is not None
        epoch, region = channel.epoch, self._shm
        try:
            # Registering is not idempotent: a name Triton still holds (from the last
            # connection, or from the gateway that had this host name and pid before)
            # is dropped first. The name is this process's own.
            with contextlib.suppress(InferenceServerException):
                await channel.client.unregister_system_shared_memory(
                    region.name, client_timeout=_SHM_CALL_S
                )
            await channel.client.register_system_shared_memory(
                region.name, region.key, region.byte_size, client_timeout=_SHM_CALL_S
            )
            channel.shm_epoch = epoch
            _LOGGER.info(
                "Triton maps %s (%d bytes) for image batches", region.key, region.byte_size
            )
        except InferenceServerException as exc:
            if (exc.status() or "").removeprefix("StatusCode.") not in _TRANSIENT:
                channel.shm_refused = True
                _LOGGER.warning(
                    "Triton cannot map the gateway's shared memory %s (%s): image batches "
                    "go to it as gRPC bytes (is it on another host?)",
                    region.key,
                    exc.message(),
                )
        except Exception as exc:  # e.g. its channel closed meanwhile: the next call tries again
            _LOGGER.debug("registering %s with Triton failed: %r", region.key, exc)
        finally:
            channel.shm_registering = None

    async def _unregister_shm(self, channel: _Channel) -> None:
        if channel.shm_epoch is None or self._shm is None:
            return
        with contextlib.suppress(Exception):  # best effort: the gateway is stopping
            await channel.client.unregister_system_shared_memory(
                self._shm.name, client_timeout=_SHM_CALL_S
            )

    def _count_transport(self, model: _TritonModel, slot: int | None) -> None:
        if self._metrics is not None and self._shm_wanted and model is self._models["image"]:
            transport = "grpc" if slot is None else "shared_memory"
            self._metrics.triton_image_batches.labels(transport).inc()

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
        self,
        replica: _Replica,
        channel: _Channel,
        model: _TritonModel,
        exc: InferenceServerException,
        started: float,
    ) -> ClipError:
        """Map a failed call's error and learn from it what the replica's state is."""
        error = self._map_error(model, exc, replica, channel)
        if isinstance(error, DeadlineExceeded):
            self._deadline_passed(replica, channel, started)
        elif not isinstance(error, BackendUnavailable):
            self._answered(replica, channel)  # Triton itself refused: the channel works
        return error

    def _map_error(
        self,
        model: _TritonModel,
        exc: InferenceServerException,
        replica: _Replica | None = None,
        channel: _Channel | None = None,
    ) -> ClipError:
        message = _REQUEST_ID.sub("", exc.message() or str(exc))
        code = (exc.status() or "").removeprefix("StatusCode.")
        where = replica.address if replica is not None else self.url
        if _QUEUE_FULL in message:
            return Overloaded(f"Triton's queue for {model.name} is full ({message})")
        if _QUEUE_TIMEOUT in message:
            return Overloaded(f"{model.name} waited in Triton's queue past its timeout ({message})")
        if code == "DEADLINE_EXCEEDED":
            return DeadlineExceeded(f"{model.name} did not answer in time ({message})")
        if code == "RESOURCE_EXHAUSTED":
            return Overloaded(f"Triton refused {model.name}: {message}")
        if code in ("UNAVAILABLE", "CANCELLED", "NOT_FOUND"):
            # NOT_FOUND: the model is not loaded (failed, being reloaded, or unloaded by
            # a Triton that is shutting down). UNAVAILABLE also: "Server not ready".
            if replica is not None:
                self._mark_unreachable(replica, message, channel)
            return BackendUnavailable(f"Triton at {where} ({model.name}): {message}")
        return BackendFailure(
            f"Triton {model.name}: {code or 'error'}: {message}", source=f"Triton {model.name}"
        )

    # ------------------------------------------------------------------ replicas
    async def _current_replicas(self) -> list[_Replica]:
        """The replicas now; a `dns:` name is looked up again when due (in the
        background, unless nothing was resolved yet)."""
        if self._target.dns is not None:
            due = time.monotonic() - self._resolved_at >= _DNS_REFRESH_S
            if due and (self._resolving is None or self._resolving.done()):
                self._resolving = self._spawn(self._resolve())
            if not self._replicas and self._resolving is not None:
                await asyncio.shield(self._resolving)
        return list(self._replicas.values())

    async def _resolve(self) -> None:
        dns = self._target.dns
        assert dns is not None
        host, port = dns
        try:
            async with asyncio.timeout(self.ready_timeout_s):
                addresses = await _lookup(host, port)
        except Exception as exc:  # keep the replicas known so far
            _LOGGER.warning("Triton at %s: cannot resolve %s (%r)", self.url, host, exc)
            self._resolved_at = time.monotonic() - _DNS_REFRESH_S + _IDENTITY_RECHECK_S
            return
        self._resolved_at = time.monotonic()
        if not addresses:
            return
        old = self._replicas
        self._replicas = {a: old.get(a) or _Replica(a) for a in addresses}
        gone = [r for a, r in old.items() if a not in self._replicas]
        for replica in gone:
            if replica.channel is not None:
                self._spawn(self._retire(replica.channel))
                replica.channel = None
        if gone or len(self._replicas) != len(old):
            _LOGGER.info(
                "Triton at %s: replicas %s (new ones serve once checked)",
                self.url, ", ".join(self._replicas),
            )  # fmt: skip

    def _probe_the_others(self, replicas: list[_Replica]) -> None:
        """Replicas not verified and serving are probed in the background (at most every
        `_IDENTITY_RECHECK_S` each): a restarted or new one rejoins by itself."""
        now = time.monotonic()
        for replica in replicas:
            channel = replica.channel
            if replica.serving and channel is not None and self._verified(channel):
                continue
            if (replica.checking is not None and not replica.checking.done()) or (
                now - replica.last_checked < _IDENTITY_RECHECK_S
            ):
                continue
            self._checking(replica)

    def _checking(self, replica: _Replica) -> asyncio.Task[bool]:
        """The probe of `replica` in progress, or a new one."""
        task = replica.checking
        if task is None or task.done():
            task = replica.checking = self._spawn(self._probe_replica(replica))
        return task

    async def _check(self, replica: _Replica) -> bool:
        return await asyncio.shield(self._checking(replica))

    async def _probe_replica(self, replica: _Replica) -> bool:
        """Ready (server and both models) and serving the expected model; never raises.
        Its answer decides whether `replica` gets calls."""
        replica.last_checked = time.monotonic()
        channel = self._channel_of(replica)
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
            self._answered(replica, channel)
            if not all(answers):
                # Draining (Triton's readiness turns false on SIGTERM), or models being
                # (re)loaded: whatever comes back may be another model.
                self._take_out(replica, "is not ready (draining, or loading its models)")
                self._forget_identity(channel)
                return False
            # Every probe: a model reloaded in place shows only in its config.
            await self._verify(replica, channel)
        except ModelMismatch:
            return False  # logged when it was found
        except Exception as exc:  # a health probe reports, it does not fail
            if isinstance(exc, TimeoutError) or _is_deadline(exc):
                self._deadline_passed(replica, channel, started)
            elif _is_unreachable(exc):
                self._mark_unreachable(replica, str(exc), channel)
            # A model config we cannot serve will not fix itself: say so loudly.
            log = _LOGGER.warning if isinstance(exc, BackendFailure) else _LOGGER.debug
            log("Triton at %s not ready: %s", replica.address, exc)
            return False
        if not replica.serving:
            _LOGGER.info("Triton at %s is ready and checked: it gets calls again", replica.address)
        replica.serving = True
        return True

    def _take_out(self, replica: _Replica, why: str) -> None:
        if replica.serving:
            _LOGGER.info("Triton at %s %s: no new calls go to it", replica.address, why)
        replica.serving = False

    # ------------------------------------------------------------------ identity
    async def _ensure_identity(self, replica: _Replica, deadline: float) -> None:
        """Return only when `replica` was seen serving the expected model on its
        channel's current connection; raise ModelMismatch (or why it could not be
        checked) otherwise."""
        if self._expected is None:
            return
        channel = self._channel_of(replica)
        for _ in range(_IDENTITY_ATTEMPTS):
            if self._verified(channel):
                return
            mismatch = replica.mismatch
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
                    await self._verify(replica, channel)
            except TimeoutError as exc:
                raise DeadlineExceeded(
                    f"Triton at {replica.address}: the served model was not checked within "
                    f"{remaining_s:.3f} s"
                ) from exc
            channel = self._channel_of(replica)
        if not self._verified(channel):
            raise BackendUnavailable(
                f"Triton at {replica.address}: the connection kept changing while the "
                "served model was checked"
            )

    async def _verify(self, replica: _Replica, channel: _Channel) -> None:
        """Read the configs on `channel` (one read at a time, shared by all who wait,
        each within its own deadline)."""
        task = channel.verifying
        if task is None or task.done():
            # Spawned: aclose() cancels it, even on a channel replaced meanwhile.
            task = channel.verifying = self._spawn(
                self._load_configs(replica, channel, self.ready_timeout_s)
            )
            # A waiter that gives up must not leave the error unretrieved.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(task)

    def _verified(self, channel: _Channel) -> bool:
        """Triton was seen serving the expected model on `channel`'s connection now,
        and nothing since made that uncertain (always, with no expected identity)."""
        return self._expected is None or channel.verified == (channel.epoch, channel.generation)

    @staticmethod
    def _forget_identity(channel: _Channel) -> None:
        """The next result on `channel` needs a fresh check (its server may be another
        one now)."""
        channel.generation += 1

    def _check_identity(
        self,
        replica: _Replica,
        channel: _Channel,
        epoch: int,
        generation: int,
        served: dict[str, ServedIdentity],
    ) -> None:
        """Compare what both configs say (read on `channel` at `epoch`, begun at
        `generation`) with the expectation; record and report it."""
        expected = self._expected
        if expected is None:
            return
        wrong = {name: got for name, got in served.items() if not got.satisfies(expected)}
        where = replica.address
        if not wrong:
            # A generation bumped during the read (the identity became uncertain
            # meanwhile) leaves the check void.
            channel.verified = (epoch, generation)
            if replica.mismatch is not None:
                _LOGGER.info("Triton at %s serves %s again: serving", where, expected.describe())
            replica.mismatch = None
            self._update_mismatch_metric()
            return
        self._forget_identity(channel)
        names = " and ".join(sorted(wrong))
        sample = next(iter(wrong.values()))
        if not all(got.stamped for got in wrong.values()):
            message = (
                f"Triton at {where} serves {names} without the model identity "
                f"({MODEL_ID_PARAMETER}, {WEIGHTS_PARAMETER} in config.pbtxt): the repository "
                "was exported before identity stamping; re-export it with `clipsvc export` "
                f"from the weights this gateway expects, {expected.describe()}"
            )
        elif len({*wrong.values()}) == 1:
            message = (
                f"Triton at {where} serves model {sample.describe()} as {names}, but this "
                f"gateway's metadata.json describes model {expected.describe()}: deploy the "
                "gateway and Triton from the same export"
            )
        else:
            each = ", ".join(f"{name} is {got.describe()}" for name, got in sorted(wrong.items()))
            message = (
                f"Triton at {where} serves other models ({each}) than this gateway's "
                f"metadata.json describes, {expected.describe()}: deploy the gateway and "
                "Triton from the same export"
            )
        error = ModelMismatch(message)
        previous = replica.mismatch
        if previous is None or str(previous[0]) != message:
            _LOGGER.error("refusing to serve from it: %s", message)
        replica.mismatch = (error, channel, epoch, time.monotonic())
        self._update_mismatch_metric()
        raise error

    def _update_mismatch_metric(self) -> None:
        """`clip_model_mismatch` is 1 while any replica serves another model."""
        if self._metrics is not None:
            mismatch = any(r.mismatch is not None for r in self._replicas.values())
            self._metrics.model_mismatch.set(int(mismatch))

    # ------------------------------------------------------------------ plumbing
    def _channel_of(self, replica: _Replica) -> _Channel:
        """`replica`'s channel: a new one when there is none, or when it went stale
        (the old one is retired)."""
        channel = replica.channel
        now = time.monotonic()
        if channel is None:
            channel = replica.channel = self._new_channel(replica.address, now)
        elif channel.stale and now - channel.created >= _RECREATE_INTERVAL_S:
            _LOGGER.debug("Triton at %s: replaced the gRPC channel", replica.address)
            self._spawn(self._retire(channel))
            channel = replica.channel = self._new_channel(replica.address, now)
        return channel

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _answered(self, replica: _Replica, channel: _Channel) -> None:
        """Triton answered on `channel` (with anything): it works."""
        channel.last_answer = time.monotonic()
        if not replica.reachable:
            replica.reachable = True
            _LOGGER.info("Triton at %s answers again", replica.address)

    def _deadline_passed(self, replica: _Replica, channel: _Channel, started: float) -> None:
        """A call begun at `started` on `channel` ran out of time.

        A slow call is no reason to reconnect: only if nothing came back on the
        channel since the call began does one liveness call check it; if that goes
        unanswered too, the channel is stale and the next call gets a fresh one.
        """
        if (
            channel.last_answer >= started
            or channel is not replica.channel
            or channel.stale
            or channel.probe is not None
        ):
            return
        channel.probe = self._spawn(self._liveness(replica, channel))

    async def _liveness(self, replica: _Replica, channel: _Channel) -> None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(_LIVENESS_PROBE_S + _OUTER_GRACE_S):
                await channel.client.is_server_live(client_timeout=_LIVENESS_PROBE_S)
            self._answered(replica, channel)
        except Exception as exc:
            if channel.last_answer < started:  # nothing at all came back meanwhile
                self._mark_unreachable(
                    replica,
                    f"no answer after a call's deadline passed, nor to a liveness call ({exc!r})",
                    channel,
                )
        finally:
            channel.probe = None

    def _mark_unreachable(
        self, replica: _Replica, reason: str, channel: _Channel | None = None
    ) -> None:
        """`replica` failed a call or a probe as gone: no calls until a probe finds it
        ready again, and its channel is replaced; whatever answers there next may be
        another server, so its model is checked first."""
        channel = channel or replica.channel
        if channel is not None:
            channel.stale = True
            self._forget_identity(channel)
        replica.serving = False
        if replica.reachable:
            replica.reachable = False
            _LOGGER.warning("Triton at %s is unreachable: %s", replica.address, reason)

    def _channel_args(self) -> list[tuple[str, Any]]:
        keepalive_s, timeout_s = self._keepalive
        return [
            *_CHANNEL_ARGS,
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", _MAX_PINGS_WITHOUT_DATA),
            # gRPC sends no keepalive ping while another ping is unanswered (the BDP
            # ping that goes out with a request), and that one waits this long (1 min
            # by default): without it a hung server holds a call for a minute.
            ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
        ]

    def _new_channel(self, address: str, now: float) -> _Channel:
        client = triton_aio.InferenceServerClient(address, channel_args=self._channel_args())
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

    async def _load_configs(self, replica: _Replica, channel: _Channel, timeout_s: float) -> None:
        """Read both model configs on `channel`; check the identity, then adopt them."""
        names = list(self._models)
        for _ in range(_IDENTITY_ATTEMPTS):
            epoch, generation = channel.epoch, channel.generation
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
                    replica, channel, next(iter(self._models.values())), exc, started
                ) from exc
            except TimeoutError as exc:
                self._deadline_passed(replica, channel, started)
                raise DeadlineExceeded(
                    f"Triton at {replica.address} did not answer in time"
                ) from exc
            self._answered(replica, channel)
            if channel.epoch == epoch:
                break  # both answers came over one connection
        else:
            raise BackendUnavailable(
                f"Triton at {replica.address}: the connection kept changing while the model "
                "configs were read"
            )
        configs = {
            name: answer.get("config", answer) for name, answer in zip(names, answers, strict=True)
        }
        self._check_identity(
            replica,
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
