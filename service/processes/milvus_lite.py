"""Milvus Lite's engine (the `milvus` binary of the `milvus-lite` wheel) on one local file.

    with MilvusLite(Path("catalog.db")) as engine:
        client = pymilvus.MilvusClient(engine.uri)     # unix:/tmp/.../milvus.sock

Why not `MilvusClient("catalog.db")`, which starts the same binary: milvus-lite 2.5.1's
package `__init__` imports `pkg_resources`, which setuptools 82 removed, so that import
fails in an up-to-date environment; and the engine it starts outlives no owner but has
no process group of its own. Here it is a `ChildServer` (own session, ended by group,
log file) started the way milvus-lite's `server.py` starts it: `milvus DB_FILE
unix:SOCKET LOG_LEVEL LOCK_FILE`, with the wheel's `lib/` on `LD_LIBRARY_PATH`.

The lock file is the engine's lifeline: this process holds an exclusive `lockf` lock
on it while the engine runs, and the engine stops by itself once it can take the lock,
i.e. when its owner is gone, even after a SIGKILL. It also keeps a second gateway off
the same file (one engine per file): `start()` then says which file is in use.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import re
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, ClassVar

from service.processes.child_server import ChildServer

# milvus-lite's own rule for the file name (server.py); the engine keys files by it.
_DB_NAME = re.compile(r"^[a-zA-Z0-9.\-_]{1,36}$")
# How long the engine gets to stop by itself once its lock is released.
_LOCK_STOP_WAIT_S = 5.0
# Lock files this process holds: POSIX locks belong to the process, so a second lockf
# here would succeed, and closing its file would drop the first engine's lifeline.
_HELD: set[Path] = set()


class MilvusLiteError(RuntimeError):
    """The engine could not start (no wheel, a bad file name, the file in use)."""


def engine_directory() -> Path:
    """The wheel's `lib/` (the `milvus` binary and its libraries), found without importing
    the package (its `__init__` needs `pkg_resources`)."""
    spec = importlib.util.find_spec("milvus_lite")
    if spec is None or not spec.submodule_search_locations:
        raise MilvusLiteError(
            "the embedded catalog needs the milvus-lite wheel: pip install milvus-lite==2.5.1"
        )
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    if not (lib / "milvus").exists():
        raise MilvusLiteError(f"milvus-lite has no engine binary at {lib / 'milvus'}")
    return lib


class MilvusLite(ChildServer):
    """One engine serving `db_file` on a unix socket in its private work directory."""

    name = "milvus-lite"
    error = MilvusLiteError
    port_names: ClassVar[tuple[str, ...]] = ()
    poll_interval_s = 0.05

    def __init__(self, db_file: Path, *, log_level: str = "ERROR", **kwargs: object) -> None:
        """Prepare (not start); `db_file` is created on first start (its folder must exist)."""
        db_file = Path(db_file).absolute()
        if not _DB_NAME.match(db_file.name):
            raise MilvusLiteError(
                f"catalog file name {db_file.name!r}: Milvus Lite takes 1-36 characters of "
                "letters, digits, '.', '-' and '_' (for example catalog.db)"
            )
        if not db_file.parent.is_dir():
            raise MilvusLiteError(f"the catalog's folder {db_file.parent} does not exist")
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.db_file = db_file
        self.log_level = log_level
        self._lib = engine_directory()
        self._lock_path = db_file.parent / f".{db_file.name}.lock"
        self._lock_file: IO[str] | None = None

    @property
    def socket_path(self) -> Path:
        """Where the engine listens (short: a unix socket path holds at most 107 bytes)."""
        return self.workdir / "milvus.sock"

    @property
    def uri(self) -> str:
        """The address pymilvus connects to."""
        return f"unix:{self.socket_path}"

    def prepare(self) -> None:
        """Take the lock (the engine's lifeline) before the engine starts."""
        self._release_lock()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        in_use = MilvusLiteError(
            f"the catalog {self.db_file} is open elsewhere (its lock {self._lock_path} is "
            "held); one engine per catalog file: share one gateway, or use a Milvus server URL"
        )
        if self._lock_path in _HELD:
            raise in_use
        lock_file = self._lock_path.open("a")
        try:
            fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise in_use from None
        self._lock_file = lock_file
        _HELD.add(self._lock_path)

    def command(self, ports: Mapping[str, int]) -> list[str]:
        """milvus-lite's own command line (server.py): file, address, level, lock."""
        return [
            str(self._lib / "milvus"),
            str(self.db_file),
            self.uri,
            self.log_level,
            str(self._lock_path),
        ]

    def environment(self) -> dict[str, str]:
        """The wheel's libraries first (it ships its own OpenBLAS, TBB, glog...)."""
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = f"{self._lib}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
        return env

    def cwd(self) -> Path:
        """The catalog's folder, as milvus-lite runs it."""
        return self.db_file.parent

    def is_ready(self, timeout_s: float = 0.5) -> bool:
        """The socket accepts a connection."""
        if not self.socket_path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            try:
                sock.connect(str(self.socket_path))
            except OSError:
                return False
            return True

    def stop(self, grace_s: float | None = None, *, kill: bool = False) -> int | None:
        """Release the lock so the engine closes its file itself, then end its group."""
        self._release_lock()
        if not kill:
            deadline = time.monotonic() + _LOCK_STOP_WAIT_S
            while self.running and time.monotonic() < deadline:
                time.sleep(0.05)  # poll for the engine's own, clean exit
        return super().stop(grace_s, kill=kill)

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.lockf(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
            _HELD.discard(self._lock_path)
