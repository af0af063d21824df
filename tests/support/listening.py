"""The TCP ports this process listens on, read from /proc (Linux): what a server bound.

A socket of this process is a `socket:[INODE]` link under /proc/self/fd; /proc/net/tcp
and tcp6 list every socket's local port, state and inode. Listening ones (state 0A)
whose inode is one of ours are what this process has bound and listens on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_LISTEN = "0A"


def _own_socket_inodes() -> set[str]:
    inodes = set()
    fds = Path("/proc/self/fd")
    for fd in os.listdir(fds):
        try:
            target = os.readlink(fds / fd)
        except OSError:  # closed meanwhile
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(match[1])
    return inodes


def listening_ports() -> set[int]:
    """TCP ports (IPv4 and IPv6) on which this process has a listening socket."""
    ours = _own_socket_inodes()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        lines = Path(table).read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _LISTEN and inode in ours:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports
