"""A real `redis-server` on a free loopback port, for tests and benchmarks.

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        ...
        server.restart()          # same port, empty data set
        server.pause()            # SIGSTOP: a hung server; resume() continues it

The server is a `ChildServer`: it runs in its own session (process group) and is
ended by group, on `stop()`, on leaving the `with` block, when the object is
collected, and at interpreter exit, so a failing test leaves nothing running.
"""

from __future__ import annotations

import shutil
import signal
import socket
from collections.abc import Mapping
from pathlib import Path

from service.processes.child_server import ChildServer

_DEFAULT_EXECUTABLE = "/usr/bin/redis-server"


class RedisServerError(RuntimeError):
    """redis-server did not start or answer in time."""


class RedisServer(ChildServer):
    """One redis-server process bound to 127.0.0.1 with persistence off."""

    name = "redis-server"
    error = RedisServerError
    poll_interval_s = 0.01

    def __init__(
        self,
        *,
        executable: str | None = None,
        start_timeout_s: float = 10.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """Prepare (not start) a server; `extra_args` are passed as config options."""
        found = executable or shutil.which("redis-server") or _DEFAULT_EXECUTABLE
        if not Path(found).exists():
            raise RedisServerError(f"redis-server not found (looked for {found})")
        super().__init__(startup_timeout_s=start_timeout_s)
        self.executable = found
        self.extra_args = extra_args

    @property
    def port(self) -> int:
        """The port it listens on; 0 before the first start."""
        return self.bound_port() if self._ports is not None else 0

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:PORT/0`."""
        if not self.port:
            raise RedisServerError("not started")
        return f"redis://{self.host}:{self.port}/0"

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections open but nothing answers, like a hang."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo `pause()`; queued commands are then answered."""
        self.send_signal(signal.SIGCONT)

    def command(self, ports: Mapping[str, int]) -> list[str]:
        """Persistence off, the log on stdout (into the log file)."""
        return [
            self.executable,
            "--port", str(ports["port"]),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def is_ready(self, timeout_s: float = 0.5) -> bool:
        """PING answers PONG."""
        if self._ports is None:
            return False
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout_s) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False
