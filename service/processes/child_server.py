"""Child servers in their own process group: free ports, and stopping the whole group.

tritonserver (with its python stubs), redis-server in the tests and the gateways the
benchmarks start all run with `start_new_session=True`, so that Ctrl-C in a terminal
reaches only the parent and a server is ended with everything it spawned.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

# After the leader exits, how long its children get to follow before SIGKILL.
_FOLLOWERS_GRACE_S = 2.0


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
    deadline = time.monotonic() + _FOLLOWERS_GRACE_S
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_members(pgid):
        signal_group(pgid, signal.SIGKILL)
        killed = True
    return int(process.returncode), killed
