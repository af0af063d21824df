"""A real `redis-server` on a free loopback port, for tests (a helper, not a test file).

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        ...
        server.restart()          # same port, empty data set
        server.pause()            # SIGSTOP: a hung server; resume() continues it

The server runs in its own session (process group) and is ended by group, on
`stop()`, on leaving the `with` block, when the object is collected, and at
interpreter exit, so a failing test leaves nothing running.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType

from service.processes.child_server import end_group, free_port

_DEFAULT_EXECUTABLE = "/usr/bin/redis-server"
_PORT_ATTEMPTS = 5


class RedisServerError(RuntimeError):
    """redis-server did not start or answer in time."""


class RedisServer:
    """One redis-server process bound to 127.0.0.1 with persistence off."""

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
        self.executable = found
        self.host = "127.0.0.1"
        self.port = 0
        self.start_timeout_s = start_timeout_s
        self.extra_args = extra_args
        self._workdir = tempfile.TemporaryDirectory(prefix="redis-test-")
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> RedisServer:
        """Start on a free port and wait until PING answers."""
        if self._process is not None:
            raise RedisServerError("already running")
        last_error: RedisServerError | None = None
        # A port found free can be taken before redis binds it: then try another.
        for _ in range(_PORT_ATTEMPTS):
            self.port = free_port(self.host)
            try:
                self._launch()
                return self
            except RedisServerError as exc:
                last_error = exc
        raise RedisServerError(f"could not start redis-server: {last_error}")

    def stop(self, *, kill: bool = False) -> None:
        """End the server's process group (SIGTERM, or SIGKILL to simulate a crash)."""
        process, self._process = self._process, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is not None:
            end_group(process, signal.SIGKILL if kill else signal.SIGTERM)

    def restart(self, *, kill: bool = False) -> None:
        """Stop and start again on the same port (the data set starts empty)."""
        self.stop(kill=kill)
        self._launch()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections open but nothing answers, like a hang."""
        if self._process is None:
            raise RedisServerError("not running")
        os.killpg(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo `pause()`; queued commands are then answered."""
        if self._process is None:
            raise RedisServerError("not running")
        os.killpg(self._process.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server and remove its working directory."""
        self.stop()
        self._workdir.cleanup()

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:PORT/0`."""
        if not self.port:
            raise RedisServerError("not started")
        return f"redis://{self.host}:{self.port}/0"

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _launch(self) -> None:
        workdir = Path(self._workdir.name)
        log_path = workdir / f"redis-{self.port}.log"
        command = [
            self.executable,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--logfile", str(log_path),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # Registered at once so that even an interrupted start leaves no process.
        finalizer = weakref.finalize(self, end_group, process, signal.SIGKILL)
        try:
            self._wait_ready(process, log_path)
        except BaseException:
            finalizer()
            raise
        self._process = process
        self._finalizer = finalizer

    def _wait_ready(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if process.poll() is not None:
                raise RedisServerError(
                    f"redis-server exited with {process.returncode} on port {self.port}: "
                    f"{_tail(log_path)}"
                )
            if _pings(self.host, self.port):
                return
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"redis-server on port {self.port} did not answer PING within "
                    f"{self.start_timeout_s} s: {_tail(log_path)}"
                )
            time.sleep(0.01)  # poll interval, not a wait for readiness


def _pings(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _tail(log_path: Path, n_chars: int = 2000) -> str:
    try:
        return log_path.read_text(errors="replace")[-n_chars:].strip() or "(empty log)"
    except OSError:
        return "(no log)"
