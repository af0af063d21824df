"""`ChildServer`: ready before `start()` returns, ports retried, nothing left running."""

from __future__ import annotations

import gc
import signal
import socket
import sys
from collections.abc import Iterator, Mapping

import pytest

from service.processes import child_server
from service.processes.child_server import ChildServer, ChildServerError, group_members

# A stand-in server: prints, answers a greeting on port argv[1] and keeps a child of
# its own in its process group; "crash" exits before listening, "mute" never listens.
_FAKE = """
import socket, subprocess, sys, time
port, mode = int(sys.argv[1]), sys.argv[2]
print("fake server starting on", port, flush=True)
if mode == "crash":
    print("boom: cannot start", flush=True)
    sys.exit(3)
listener = socket.socket()
# As real servers do: a restart binds again while the last run's connections linger.
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
follower = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
if mode == "mute":
    time.sleep(600)
listener.listen()
print("listening", flush=True)
while True:
    connection = listener.accept()[0]
    connection.sendall(b"fake server\\n")
    connection.close()
"""


class FakeServer(ChildServer):
    name = "fake server"

    def __init__(self, mode: str = "serve", **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.mode = mode

    def command(self, ports: Mapping[str, int]) -> list[str]:
        return [sys.executable, "-c", _FAKE, str(ports["port"]), self.mode]

    def is_ready(self, timeout_s: float = 1.0) -> bool:
        if self._ports is None:
            return False
        try:
            with socket.create_connection((self.host, self.bound_port()), timeout=timeout_s) as s:
                return s.recv(64) == b"fake server\n"  # not whatever else listens there
        except OSError:
            return False


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_start_waits_until_ready_and_stop_ends_the_whole_group() -> None:
    with FakeServer() as server:
        assert server.is_ready()
        pgid = server.pid
        assert pgid is not None
        assert len(group_members(pgid)) == 2  # the server and its follower
        assert "listening" in server.log_tail()
        assert server.stop() is not None
        assert not server.running
        assert group_members(pgid) == []


def test_restart_answers_on_the_same_port() -> None:
    with FakeServer() as server:
        port = server.bound_port()
        server.restart(kill=True)
        assert server.bound_port() == port and server.is_ready()


def test_a_port_taken_meanwhile_is_replaced_by_another(
    monkeypatch: pytest.MonkeyPatch, taken_port: int
) -> None:
    offered = iter([taken_port])
    real_free_port = child_server.free_port
    monkeypatch.setattr(
        child_server, "free_port", lambda host: next(offered, None) or real_free_port(host)
    )
    with FakeServer() as server:
        assert server.bound_port() != taken_port and server.is_ready()
        assert "Address already in use" in server.log_tail()  # the first try's traceback


def test_a_fixed_port_is_not_retried_and_the_error_carries_the_log(taken_port: int) -> None:
    server = FakeServer(ports={"port": taken_port})
    with pytest.raises(ChildServerError, match="exited with 1 before it was ready"):
        server.start()
    assert not server.running
    server.close()


def test_a_crash_at_start_is_reported_with_the_log_tail() -> None:
    server = FakeServer("crash")
    with pytest.raises(ChildServerError, match="boom: cannot start"):
        server.start()
    server.close()


def test_not_ready_in_time_leaves_nothing_running(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    monkeypatch.setattr(FakeServer, "prepare", lambda self: started.append(1))
    server = FakeServer("mute", startup_timeout_s=0.5)
    with pytest.raises(ChildServerError, match="not ready within"):
        server.start()
    assert started == [1]  # one attempt: a child that runs is not a port problem
    assert not server.running
    server.close()


def test_a_forgotten_server_is_ended_with_its_group() -> None:
    server = FakeServer().start()
    pgid = server.pid
    workdir = server.workdir
    assert pgid is not None and group_members(pgid)
    del server
    gc.collect()
    assert group_members(pgid) == []
    assert not workdir.exists()


def test_after_a_signal_to_the_leader_alone_a_start_ends_the_rest_first() -> None:
    server = FakeServer().start()
    pgid, port = server.pid, server.bound_port()
    assert pgid is not None
    server.send_signal(signal.SIGTERM, group=False)  # as Kubernetes does: PID 1 only
    assert server.wait(10) == -signal.SIGTERM
    assert not server.running and group_members(pgid)  # the follower outlived its leader
    server.start()
    assert group_members(pgid) == []
    assert server.bound_port() == port and server.is_ready()
    server.close()
    with pytest.raises(ChildServerError, match="not running"):
        server.send_signal(signal.SIGTERM)
