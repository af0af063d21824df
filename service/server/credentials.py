"""What callers prove themselves with, kept fresh: API keys and TLS certificates.

Both are read from files that Kubernetes updates in place (a mounted Secret is an
atomically swapped symlink), so both are re-read when the files change, without a
restart:
- `ApiKeys`: the key file is checked at most once a second (one `stat`); a file that is
  missing or unreadable mid-swap keeps the last good keys.
- `tls_server_credentials`: grpc's dynamic server credentials ask for the certificate
  configuration at each new TLS handshake; a changed file is read again then.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

_LOGGER = logging.getLogger(__name__)
_CHECK_INTERVAL_S = 1.0


def _stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced or rewritten (follows symlinks)."""
    info = os.stat(path)
    return (info.st_ino, info.st_mtime_ns, info.st_size)


def _read_keys(path: Path) -> frozenset[str]:
    keys = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.add(line)
    return frozenset(keys)


class ApiKeys:
    """Accepted API keys: fixed ones plus those of a key file, re-read when it changes.

    `enabled` is decided once: with keys or a key file configured, every call needs a
    key, even while the file is empty (fail closed).
    """

    def __init__(
        self,
        fixed: frozenset[str],
        file: Path | None,
        *,
        check_interval_s: float = _CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fixed = frozenset(k for k in fixed if k)
        self._file = file
        self._interval_s = check_interval_s
        self._clock = clock
        self._from_file: frozenset[str] = frozenset()
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self.enabled = bool(self._fixed) or file is not None
        if file is not None:
            self._stamp = _stamp(file)  # a missing file at start is a configuration error
            self._from_file = _read_keys(file)
            self._checked_at = clock()
        self._current = tuple(k.encode() for k in self._fixed | self._from_file)

    def current(self) -> tuple[bytes, ...]:
        """The keys accepted now (the file re-read first if it changed)."""
        if self._file is not None and self._clock() - self._checked_at >= self._interval_s:
            self._checked_at = self._clock()
            self._refresh(self._file)
        return self._current

    def accepts(self, authorization: str | bytes | None) -> bool:
        """Whether an `authorization` header value (`Bearer <key>`) carries an accepted key.

        Compared against every key, always, so timing reveals nothing about which matched."""
        raw = authorization.encode() if isinstance(authorization, str) else authorization or b""
        presented = raw[7:].strip() if raw[:7].lower() == b"bearer " else b""
        matched = False
        for key in self.current():
            matched |= hmac.compare_digest(presented, key)
        return matched and bool(presented)

    def _refresh(self, file: Path) -> None:
        try:
            stamp = _stamp(file)
            if stamp == self._stamp:
                return
            keys = _read_keys(file)
        except OSError as exc:
            _LOGGER.warning("API key file %s unreadable (%s); keeping the last keys", file, exc)
            return
        self._stamp, self._from_file = stamp, keys
        self._current = tuple(k.encode() for k in self._fixed | keys)
        _LOGGER.info("API key file %s changed: %d keys now", file, len(self._current))


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS on the gRPC port; with `client_ca`, clients need a certificate."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        """Changes whenever any of the files does."""
        paths = [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])
        return tuple(_stamp(p) for p in paths)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as grpc's certificate configuration (read now)."""
        return grpc.ssl_server_certificate_configuration(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
        )


def tls_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that pick up changed certificate files at the next handshake."""
    state = {"stamp": files.stamp()}

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc for each new handshake: None keeps the current configuration.
        try:
            stamp = files.stamp()
            if stamp == state["stamp"]:
                return None
            configuration = files.configuration()
        except (OSError, ValueError) as exc:
            _LOGGER.warning("TLS files unreadable (%s); keeping the last certificate", exc)
            return None
        state["stamp"] = stamp
        _LOGGER.info("TLS certificate files changed: new handshakes use them")
        return configuration

    return grpc.dynamic_ssl_server_credentials(
        files.configuration(),
        fetch,
        require_client_authentication=files.client_ca is not None,
    )
