"""`Supervisor`: a dead child is started again, failed starts are retried with a back-off,
and a stop is never taken for a crash (a fake child; the real engine's crash is in
tests/integration/test_catalog.py)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from service.processes.supervisor import Supervisor


class FakeChild:
    """A child that is `running` until `crash()`; its next `failures` starts raise."""

    name = "fake child"

    def __init__(self, failures: int = 0) -> None:
        self.running = True
        self.pid: int | None = 100
        self.failures = failures
        self.starts = 0
        self.lock = threading.Lock()

    def crash(self) -> None:
        self.running = False

    def wait(self, timeout_s: float) -> int:
        return -9

    def log_tail(self, n_chars: int = 3000) -> str:
        return "last words"

    def start(self) -> FakeChild:
        with self.lock:
            self.starts += 1
            if self.failures:
                self.failures -= 1
                raise RuntimeError("port taken")
            self.running, self.pid = True, 100 + self.starts
            return self


def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@contextlib.contextmanager
def _watching(child: FakeChild, **options: Any) -> Iterator[Supervisor]:
    """A supervisor of `child` checking every 10 ms, stopped at the end of the block."""
    supervisor = Supervisor(child, check_every_s=0.01, **options)  # type: ignore[arg-type]
    supervisor.start()
    try:
        yield supervisor
    finally:
        supervisor.stop()


def test_a_dead_child_is_started_again_once_and_reported() -> None:
    child = FakeChild()
    restarted: list[int | None] = []
    with _watching(child, on_restart=lambda: restarted.append(child.pid)) as supervisor:
        time.sleep(0.05)
        assert child.starts == 0  # running: left alone
        child.crash()
        _until(lambda: supervisor.restarts == 1)
        time.sleep(0.05)
        assert (child.starts, restarted) == (1, [101])


def test_failed_starts_are_retried_with_a_growing_pause() -> None:
    child = FakeChild(failures=3)
    with _watching(child, max_backoff_s=0.04) as supervisor:
        began = time.monotonic()
        child.crash()
        _until(lambda: supervisor.restarts == 1)
        # Pauses of 0.01, 0.02 and 0.04 s between the four starts.
        assert child.starts == 4 and child.running
        assert time.monotonic() - began >= 0.06  # (a timed wait may end a hair early)


def test_after_stop_a_dead_child_stays_down() -> None:
    child = FakeChild(failures=1000)
    with _watching(child, max_backoff_s=30.0) as supervisor:
        child.crash()
        _until(lambda: child.starts >= 2)  # now in a long back-off
        began = time.monotonic()
        supervisor.stop()
        assert time.monotonic() - began < 2.0  # the pause ends with the stop
        starts = child.starts
        time.sleep(0.05)
        assert child.starts == starts and not child.running
