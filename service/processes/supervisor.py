"""Keeps a child server this process owns running: a crash is followed by a restart.

Contract: `start()` once the child is up; from then on a thread of its own checks every
`check_every_s` whether the child still runs and, when it died, logs why (its exit code
and the end of its log) and starts it again on the same address, retrying with a
back-off (doubling up to `max_backoff_s`) while starts fail. `stop()` ends the watch
and must come before the child is stopped on purpose, or the stop would pass for a
crash. It imports nothing from its callers: what to do after a restart is `on_restart`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from service.processes.child_server import ChildServer

_LOGGER = logging.getLogger(__name__)


class Supervisor:
    """Restarts `child` whenever it is found dead, until `stop()`."""

    def __init__(
        self,
        child: ChildServer,
        *,
        check_every_s: float = 0.5,
        max_backoff_s: float = 30.0,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.child = child
        self.check_every_s = check_every_s
        self.max_backoff_s = max_backoff_s
        self.on_restart = on_restart
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Begin watching (the child must be running)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._watch, name=f"supervise-{self.child.name}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout_s: float = 90.0) -> None:
        """End the watch; waits for a restart in progress (a start blocks until ready)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.check_every_s):
            if self.child.running:
                continue
            _LOGGER.error(
                "%s died (exit code %s); restarting it. End of its log:\n%s",
                self.child.name,
                self.child.wait(0) if self.child.pid is not None else "?",
                self.child.log_tail(1500),
            )
            self._restart()

    def _restart(self) -> None:
        backoff = self.check_every_s
        while not self._stop.is_set():
            try:
                self.child.start()
            except Exception as exc:  # the child's own error: log it, try again later
                _LOGGER.error("%s did not start again: %s", self.child.name, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            self.restarts += 1
            _LOGGER.warning("%s restarted (pid %s)", self.child.name, self.child.pid)
            if self.on_restart is not None:
                self.on_restart()
            return
