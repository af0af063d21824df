"""Child servers in their own process group: free ports, stopping the whole group, `ChildServer`.

tritonserver (with its python stubs), redis-server and the gateways the tests and
benchmarks start all run with `start_new_session=True`, so that Ctrl-C in a terminal
reaches only the parent and a server is ended with everything it spawned.
`ChildServer` is that lifecycle once: start, wait until ready, keep a log, end by
process group; `TritonProcess`, `RedisServer` and `GatewayProcess` say what to run.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self

_LOGGER = logging.getLogger(__name__)

# After the leader exits, how long its children get to follow before SIGKILL.
_FOLLOWERS_GRACE_S = 2.0
# After SIGKILL, how long to wait for the leader to be reaped.
_KILL_WAIT_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for a child that needs a fixed one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    if pgid <= 0:
        raise ValueError(f"not a process group id: {pgid}")
    members: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """`killpg`, quiet when the group is already gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def end_group(
    process: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM, grace_s: float = 10.0
) -> tuple[int, bool]:
    """Send `sig` to the group led by `process`, SIGKILL it after `grace_s`, reap the leader.

    Returns the leader's exit code and whether SIGKILL was needed. Members that
    outlive the leader get a moment to follow it, then SIGKILL, so none is left.
    """
    pgid = process.pid
    killed = False
    # Only signal the group while its leader is unreaped: after wait() the id may be
    # reused. Members outliving a dead leader are handled below.
    if process.poll() is None:
        signal_group(pgid, sig)
        # A paused (SIGSTOPped) group would not act on SIGTERM until continued.
        signal_group(pgid, signal.SIGCONT)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            signal_group(pgid, signal.SIGKILL)
            process.wait()
            killed = True
    if not _until_gone(pgid, _FOLLOWERS_GRACE_S):
        signal_group(pgid, signal.SIGKILL)
        killed = True
        # SIGKILL is not instant: return once the members are gone (or zombies).
        _until_gone(pgid, _KILL_WAIT_S)
    return int(process.returncode), killed


def _until_gone(pgid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for a group to have no live members; whether it has none."""
    deadline = time.monotonic() + timeout_s
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


class ChildServerError(RuntimeError):
    """A child server could not start, or was not ready in time."""


class _ExitedEarly(Exception):
    """The child exited before it was ready: with ports picked here, likely one was taken."""


class ChildServer:
    """One server process in its own session, on loopback ports, with a log file.

    A subclass says what to run and how to tell it is ready: `command(ports)`,
    `is_ready()`, and where needed `environment()`, `cwd()`, `prepare()`,
    `startup_failure()` and `cleanup_callback()`. What callers may rely on:

    - `start()` blocks until `is_ready()`; when it raises (the subclass's `error`,
      with the end of the log), nothing is left running.
    - A port given as 0 is replaced by a free one at the first start, and kept by
      later starts (`restart()` answers on the same address). When the child exits
      before it is ready and a port was picked here, other free ports are tried:
      a port found free can be taken before the child binds it.
    - `stop()` ends the whole process group: SIGTERM, SIGKILL after the grace. The
      same happens (SIGKILL) when the object is collected or the interpreter exits,
      so a failing test or an interrupted benchmark leaves nothing running.
    """

    name: ClassVar[str] = "child server"
    error: ClassVar[type[RuntimeError]] = ChildServerError
    port_names: ClassVar[tuple[str, ...]] = ("port",)
    port_attempts: ClassVar[int] = 4
    poll_interval_s: ClassVar[float] = 0.1
    not_ready_hint: ClassVar[str] = ""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        ports: Mapping[str, int] | None = None,
        workdir: Path | None = None,
        log_path: Path | None = None,
        log_name: str | None = None,
        inherit_output: bool = False,
        startup_timeout_s: float = 60.0,
        stop_grace_s: float = 10.0,
    ) -> None:
        """Prepare (not start).

        `workdir` holds the log file (`log_name`, default the server's name, + `.log`)
        and whatever the child writes; when not given a temporary one is made and
        removed by `close()` or at exit. With `inherit_output` the child writes to
        this process's stdout/stderr instead of `log_path`.
        """
        unknown = set(ports or {}) - set(self.port_names)
        if unknown:
            raise ValueError(f"{self.name} has no port named {sorted(unknown)}")
        self.host = host
        self._requested = {name: 0 for name in self.port_names} | dict(ports or {})
        self._ports: dict[str, int] | None = None
        self._own_workdir = workdir is None
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix=f"{self.name.replace(' ', '-')}-"))
            self._remove_workdir = weakref.finalize(self, shutil.rmtree, workdir, True)
        self.workdir = Path(workdir)
        self.log_path = (
            Path(log_path)
            if log_path is not None
            else self.workdir / f"{log_name or self.name.replace(' ', '-')}.log"
        )
        self.inherit_output = inherit_output
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._cleanup: Callable[[], None] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ for subclasses
    def command(self, ports: Mapping[str, int]) -> list[str]:
        """The command line for these ports."""
        raise NotImplementedError

    def is_ready(self, timeout_s: float = 1.0) -> bool:
        """One readiness check on the current ports; False while not started."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """The child's environment (default: this process's)."""
        return dict(os.environ)

    def cwd(self) -> Path:
        """The child's working directory (default: `workdir`)."""
        return self.workdir

    def prepare(self) -> None:
        """Runs before each launch (files the command refers to, per-launch names)."""

    def startup_failure(self) -> str | None:
        """Why the start cannot succeed, although the child runs; None to keep waiting."""
        return None

    def cleanup_callback(self) -> Callable[[], None] | None:
        """Removes what a killed child leaves behind; runs after the group ends.

        Also runs from the finalizer, so it must not hold on to `self`.
        """
        return None

    # ------------------------------------------------------------------ state
    def bound_port(self, name: str = "port") -> int:
        """A port the server listens on (known once started)."""
        if self._ports is None:
            raise self.error(f"{self.name} not started yet")
        return self._ports[name]

    @property
    def pid(self) -> int | None:
        """Process id of the server, which is also its process group id; None when stopped."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the server process is alive (not necessarily ready)."""
        return self._process is not None and self._process.poll() is None

    def log_tail(self, n_chars: int = 3000) -> str:
        """The end of the server's log (empty with `inherit_output` or before a start)."""
        if self.inherit_output:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:].strip()
        except OSError:
            return ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Start and block until ready; on failure nothing is left running."""
        with self._lock:
            if self.running:
                raise self.error(f"{self.name} already running (pid {self.pid})")
            self._end(signal.SIGKILL, _KILL_WAIT_S)  # reap one that exited on its own
            if self._ports is not None:  # a restart: the same address as before
                attempts, fixed = 1, dict(self._ports)
            else:
                picked = 0 in self._requested.values()
                attempts, fixed = (self.port_attempts if picked else 1), None
            failure = ""
            for attempt in range(1, attempts + 1):
                ports = fixed or {
                    name: port or free_port(self.host) for name, port in self._requested.items()
                }
                try:
                    self._launch(ports)
                    return self
                except _ExitedEarly as exc:
                    failure = str(exc)
                    _LOGGER.warning(
                        "%s did not start (attempt %d of %d): %s", self.name, attempt, attempts, exc
                    )
            raise self.error(failure)

    def stop(self, grace_s: float | None = None, *, kill: bool = False) -> int | None:
        """End the process group: SIGTERM, SIGKILL after `grace_s`; `kill`: SIGKILL at once.

        Returns the exit code, None when it was not running.
        """
        with self._lock:
            if kill:
                return self._end(signal.SIGKILL, _KILL_WAIT_S)
            return self._end(signal.SIGTERM, self.stop_grace_s if grace_s is None else grace_s)

    def kill(self) -> int | None:
        """SIGKILL the whole group at once, like a crash (for fault tests)."""
        return self.stop(kill=True)

    def restart(self, *, kill: bool = False) -> Self:
        """Stop (or kill) and start again on the same ports; blocks until ready."""
        self.stop(kill=kill)
        return self.start()

    def close(self) -> None:
        """Stop the server and remove the working directory if it was made here."""
        self.stop()
        if self._own_workdir:
            self._remove_workdir()

    def send_signal(self, sig: signal.Signals, *, group: bool = True) -> None:
        """Send `sig` to the whole group, or to the leader alone (as Kubernetes does)."""
        if self._process is None:
            raise self.error(f"{self.name} not running")
        if group:
            signal_group(self._process.pid, sig)
        else:
            self._process.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        """Wait for the leader to exit on its own (after `send_signal`); its exit code."""
        if self._process is None:
            raise self.error(f"{self.name} not running")
        return self._process.wait(timeout=timeout_s)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _end(self, sig: signal.Signals, grace_s: float) -> int | None:
        process, self._process = self._process, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is None:
            return None
        return _end_child(self.name, process, sig, grace_s, self._cleanup)

    def _launch(self, ports: dict[str, int]) -> None:
        previous, self._ports = self._ports, ports
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.prepare()
            command = self.command(ports)
            self._cleanup = self.cleanup_callback()
            where = ", ".join(f"{name} {port}" for name, port in ports.items())
            _LOGGER.info("starting %s on %s (%s)", self.name, self.host, where)
            _LOGGER.debug("%s command: %s", self.name, " ".join(command))
            log_file: IO[bytes] | None = None
            if not self.inherit_output:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log_file = self.log_path.open("ab")
            try:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT if log_file is not None else None,
                    env=self.environment(),
                    cwd=self.cwd(),
                    # Own session: Ctrl-C in a terminal reaches only us, and the group
                    # (the server and what it spawns) can be ended as one.
                    start_new_session=True,
                )
            finally:
                if log_file is not None:
                    log_file.close()
            # Registered at once so that an interrupted start or a forgotten object
            # leaves nothing running.
            finalizer = weakref.finalize(
                self, _end_child, self.name, process, signal.SIGKILL, _KILL_WAIT_S, self._cleanup
            )
            started = time.monotonic()
            try:
                self._wait_ready(process, where)
            except BaseException:
                finalizer()
                raise
        except BaseException:
            self._ports = previous
            raise
        self._process = process
        self._finalizer = finalizer
        _LOGGER.info(
            "%s ready in %.1f s (pid %d, %s)",
            self.name, time.monotonic() - started, process.pid, where,
        )  # fmt: skip

    def _wait_ready(self, process: subprocess.Popen[bytes], where: str) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = process.poll()
            if code is not None:
                raise _ExitedEarly(
                    f"{self.name} exited with {code} before it was ready ({where}); "
                    f"log tail:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            reason = self.startup_failure()
            if reason is not None:
                raise self.error(f"{self.name} started but {reason}\nlog tail:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise self.error(
                    f"{self.name} was not ready within {self.startup_timeout_s:.0f} s"
                    f"{self.not_ready_hint}; log tail:\n{self.log_tail()}"
                )
            time.sleep(self.poll_interval_s)  # poll interval, not a wait for readiness


def _end_child(
    name: str,
    process: subprocess.Popen[bytes],
    sig: signal.Signals,
    grace_s: float,
    cleanup: Callable[[], None] | None,
) -> int:
    """End `process`'s group, say so, and run the cleanup (also the finalizer's work)."""
    code, killed = end_group(process, sig, grace_s)
    if killed and sig != signal.SIGKILL:
        _LOGGER.warning(
            "%s (pid %d) or a member of its group outlived SIGTERM (%.0f s): SIGKILLed",
            name, process.pid, grace_s,
        )  # fmt: skip
    if cleanup is not None:
        cleanup()
    _LOGGER.info("%s (pid %d) ended with %s", name, process.pid, code)
    return code
