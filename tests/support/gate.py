"""A gate in front of a gateway's backend: the test decides when a forward pass may run.

Tests about deadlines, drains, queue bounds and callers leaving mid-batch need work to
be still running at a given moment. Making the work big and hoping the machine is slow
enough fails on fast machines (and on slow ones with short deadlines); a gate makes the
moment explicit instead:

    gate = Gate()                                   # open: calls pass, and are recorded
    async with gated_gateway(settings, gate) as gw:
        gate.close()                                # image forward passes wait here now
        ...                                         # start calls; `await gate.wait_calls(n)`
        gate.open()                                 # let them finish

`GatedBackend` wraps the real backend (the exported TorchScript still computes every
vector); it sits where `BatchedBackend` calls its inner backend, so everything in front
of it (validation, cache, admission, batching queue, deadlines) is the real code.

A gateway in a child process (`GatedGatewayProcess`, a real `clipsvc serve` with the
same wrapper installed by `tests.support.gated_serve`) is gated through a folder
instead (`FileGate`): a `hold` file closes it, and each call is appended to `calls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from unittest import mock

import numpy as np

from service.processes.gateway import GatewayProcess

if TYPE_CHECKING:
    from service.backends.base import Backend
    from service.server.app import Gateway
    from service.settings import Settings

#: Environment variable naming a `FileGate` folder for `tests.support.gated_serve`.
GATE_DIR_ENV = "CLIPTEST_GATE_DIR"


@dataclass(frozen=True)
class GateCall:
    """One call that reached the backend: its modality, rows and the timeout it was given."""

    modality: str
    rows: int
    timeout_s: float | None


class Passage(Protocol):
    """What `GatedBackend` asks before each backend call."""

    async def passage(self, call: GateCall) -> None:
        """Record `call`; return when it may run."""


class Gate:
    """In-process gate: while closed, backend calls of `modalities` wait; all are recorded.

    Open at first, so a gateway warms up and serves as usual until the test closes it.
    """

    def __init__(self, modalities: tuple[str, ...] = ("image",), *, closed: bool = False) -> None:
        self.modalities = frozenset(modalities)
        #: Every call that reached the backend, in arrival order (gated or not).
        self.calls: list[GateCall] = []
        #: Calls waiting at the gate now.
        self.waiting = 0
        #: Rows handed to the batching queue in front of the backend, by modality.
        self.arrivals: dict[str, int] = {"image": 0, "text": 0}
        self._closed = closed
        self._permits = 0
        self._changed = asyncio.Event()

    @property
    def closed(self) -> bool:
        """Whether calls of the gated modalities wait."""
        return self._closed

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        """From now on, gated calls wait (calls already past the gate run on)."""
        self._closed = True
        self._notify()

    def open(self) -> None:
        """Let every waiting and future call through."""
        self._closed = False
        self._notify()

    def allow(self, n: int = 1) -> None:
        """Let the next `n` gated calls through while staying closed."""
        self._permits += n
        self._notify()

    async def passage(self, call: GateCall) -> None:
        """Record `call`; while the gate is closed (and no permit is left), wait."""
        self.calls.append(call)
        self._notify()
        if call.modality not in self.modalities:
            return
        self.waiting += 1
        try:
            while self._closed:
                if self._permits > 0:
                    self._permits -= 1
                    break
                await self._changed.wait()
        finally:
            self.waiting -= 1
            self._notify()

    def arrived(self, modality: str, rows: int) -> None:
        """`rows` were handed to the batching queue (they join it on the next loop turn)."""
        self.arrivals[modality] += rows
        self._notify()

    def gated_calls(self) -> list[GateCall]:
        """The recorded calls of the gated modalities."""
        return [c for c in self.calls if c.modality in self.modalities]

    async def wait_queued(
        self, rows: int, modality: str = "image", timeout_s: float = 60.0
    ) -> None:
        """Until `rows` rows in all have been handed to the batching queue, and are in it."""
        await self.wait_until(
            lambda: self.arrivals[modality] >= rows, f"{rows} {modality} rows queued", timeout_s
        )
        # The queue takes a submission in a task that runs on the next turn of the loop
        # (`asyncio.gather` schedules it): a few turns and every one of them is in.
        for _ in range(5):
            await asyncio.sleep(0)

    async def wait_until(self, condition: Any, what: str, timeout_s: float = 60.0) -> None:
        """Wait (event-driven) until `condition()` holds; `timeout_s` only catches a hang."""
        try:
            async with asyncio.timeout(timeout_s):
                while not condition():
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"gate: not {what} within {timeout_s} s; calls {self.calls}"
            ) from None

    async def wait_calls(self, n: int, timeout_s: float = 60.0) -> None:
        """Until `n` gated calls have reached the gate (passed or waiting)."""
        await self.wait_until(lambda: len(self.gated_calls()) >= n, f"{n} calls", timeout_s)

    async def wait_waiting(self, n: int, timeout_s: float = 60.0) -> None:
        """Until `n` calls wait at the gate at once."""
        await self.wait_until(lambda: self.waiting >= n, f"{n} calls waiting", timeout_s)


class FileGate:
    """A gate shared with a child process through a folder: `hold` closes it, `calls` logs."""

    def __init__(self, directory: Path, modalities: tuple[str, ...] = ("image",)) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.modalities = frozenset(modalities)
        self._hold = self.directory / "hold"
        self._calls = self.directory / "calls"

    # The test's side.
    def close(self) -> None:
        """Gated calls wait from now on."""
        self._hold.touch()

    def open(self) -> None:
        """Let waiting and future calls through."""
        self._hold.unlink(missing_ok=True)

    def calls(self) -> list[GateCall]:
        """Calls that reached the child's backend so far."""
        try:
            lines = self._calls.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [GateCall(**json.loads(line)) for line in lines if line.endswith("}")]

    def gated_calls(self) -> list[GateCall]:
        """The recorded calls of the gated modalities."""
        return [c for c in self.calls() if c.modality in self.modalities]

    async def wait_rows(self, rows: int, timeout_s: float = 120.0) -> None:
        """Until gated calls carrying `rows` rows in all have reached the child's gate."""
        deadline = time.monotonic() + timeout_s
        while sum(c.rows for c in self.gated_calls()) < rows:
            if time.monotonic() > deadline:
                raise AssertionError(f"gate: {rows} rows never arrived; calls {self.calls()}")
            await asyncio.sleep(0.02)  # poll interval of a file, not a wait for the work

    # The child's side.
    async def passage(self, call: GateCall) -> None:
        """Record `call`; while `hold` exists, gated calls wait."""
        with self._calls.open("a") as log:
            log.write(json.dumps(asdict(call)) + "\n")
        if call.modality not in self.modalities:
            return
        while True:
            if not self._hold.exists():
                return
            await asyncio.sleep(0.01)  # poll interval of a file


class GatedBackend:
    """A `Backend` that asks a gate before each call of the real backend it wraps."""

    def __init__(self, inner: Backend, gate: Passage) -> None:
        self.inner = inner
        self.name = inner.name
        self._gate = gate

    @property
    def max_batch_size(self) -> int:
        """The wrapped backend's limit."""
        return self.inner.max_batch_size

    async def start(self) -> None:
        """Start the wrapped backend."""
        await self.inner.start()

    async def ready(self) -> bool:
        """The wrapped backend's readiness."""
        return await self.inner.ready()

    async def embed_images(
        self, pixels_uint8: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """Through the gate, then the real image encoder."""
        await self._gate.passage(GateCall("image", len(pixels_uint8), timeout_s))
        return await self.inner.embed_images(pixels_uint8, timeout_s=timeout_s)

    async def embed_texts(
        self, token_ids: np.ndarray, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """Through the gate, then the real text encoder."""
        await self._gate.passage(GateCall("text", len(token_ids), timeout_s))
        return await self.inner.embed_texts(token_ids, timeout_s=timeout_s)

    async def aclose(self) -> None:
        """Close the wrapped backend."""
        await self.inner.aclose()


@contextlib.contextmanager
def gated_wiring(gate: Passage) -> Iterator[None]:
    """While inside, gateways built by `service.wiring` get their backend behind `gate`."""
    from service import wiring

    original = wiring.build_backend

    def build_backend(*args: Any, **kwargs: Any) -> Backend:
        batched = original(*args, **kwargs)
        batched.inner = GatedBackend(batched.inner, gate)
        arrived = getattr(gate, "arrived", None)
        if arrived is not None:  # count what reaches the batching queue, too
            submit_images, submit_texts = batched.embed_images, batched.embed_texts

            async def embed_images(pixels: np.ndarray, *, timeout_s: float | None = None) -> Any:
                arrived("image", len(pixels))
                return await submit_images(pixels, timeout_s=timeout_s)

            async def embed_texts(ids: np.ndarray, *, timeout_s: float | None = None) -> Any:
                arrived("text", len(ids))
                return await submit_texts(ids, timeout_s=timeout_s)

            batched.embed_images, batched.embed_texts = embed_images, embed_texts
        return batched

    with mock.patch.object(wiring, "build_backend", build_backend):
        yield


@contextlib.asynccontextmanager
async def gated_gateway(
    settings: Settings, gate: Gate, *, wait_serving: bool = True
) -> AsyncIterator[Gateway]:
    """An in-process gateway whose backend is behind `gate`; the gate opens at the end."""
    from service.wiring import build_gateway

    with gated_wiring(gate):
        gateway = build_gateway(settings)
    await gateway.start()
    try:
        if wait_serving:
            await gateway.wait_until_serving(120)
        yield gateway
    finally:
        gate.open()  # nothing held may outlive the test
        await gateway.stop(1.0)


class GatedGatewayProcess(GatewayProcess):
    """A real `clipsvc serve` child whose backend is behind a `FileGate` in `gate_dir`."""

    def __init__(self, repository: Path, gate: FileGate, **kwargs: Any) -> None:
        super().__init__(repository, **kwargs)
        self.gate = gate

    def command(self, ports: Mapping[str, int]) -> list[str]:
        """`serve` exactly as `GatewayProcess` runs it, through `tests.support.gated_serve`."""
        command = super().command(ports)
        assert command[1:3] == ["-m", "service.cli"], command
        return [sys.executable, "-m", "tests.support.gated_serve", *command[3:]]

    def environment(self) -> dict[str, str]:
        """The gateway's environment plus the gate folder."""
        return {**super().environment(), GATE_DIR_ENV: str(self.gate.directory)}


def gate_from_environment() -> FileGate:
    """The child's side: the `FileGate` its parent named."""
    return FileGate(Path(os.environ[GATE_DIR_ENV]))
