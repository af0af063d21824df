"""What callers prove themselves with, kept fresh: API keys and TLS certificates.

Both are read from files that Kubernetes updates in place (a mounted Secret is an
atomically swapped symlink), so both are re-read when the files change, without a
restart:
- `ApiKeys`: the key file is checked at most once a second (one `stat`); a file that is
  missing or unreadable mid-swap keeps the last good keys.
- `tls_server_credentials` (gRPC) and `tls_server_context` (HTTPS): at each new TLS
  handshake the files' stamps are compared; changed files are read again then, and the
  handshake (and every later one) uses them. Unreadable files keep the last certificate.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import grpc

_LOGGER = logging.getLogger(__name__)
_CHECK_INTERVAL_S = 1.0
_Built = TypeVar("_Built")


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


class _Reread(Generic[_Built]):
    """What `build` makes of the TLS files, made again when a file changes."""

    def __init__(self, files: TlsFiles, build: Callable[[TlsFiles], _Built]) -> None:
        self._files = files
        self._build = build
        self._stamp = files.stamp()
        self.current = build(files)  # unreadable at start: a configuration error

    def changed(self) -> _Built | None:
        """The files built again if any changed since last time, else None (also when
        they are unreadable mid-swap: the last good build stays in use)."""
        try:
            stamp = self._files.stamp()
            if stamp == self._stamp:
                return None
            built = self._build(self._files)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            _LOGGER.warning("TLS files unreadable (%s); keeping the last certificate", exc)
            return None
        self._stamp, self.current = stamp, built
        _LOGGER.info("TLS certificate files changed: new handshakes use them")
        return built


def tls_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """gRPC server credentials that pick up changed files at the next handshake."""
    configurations = _Reread(files, TlsFiles.configuration)
    return grpc.dynamic_ssl_server_credentials(
        configurations.current,
        # Called by grpc for each new handshake: None keeps the current configuration.
        configurations.changed,
        require_client_authentication=files.client_ca is not None,
    )


def tls_server_context(files: TlsFiles) -> ssl.SSLContext:
    """An HTTPS server context that picks up changed files at the next handshake.

    The server creates every connection from the first context; its SNI callback, which
    OpenSSL calls on every ClientHello (with or without a server name), moves the
    connection onto the context built from the newest files before any certificate is
    sent or checked."""
    contexts: _Reread[ssl.SSLContext]

    def on_hello(connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: object) -> None:
        contexts.changed()
        if connection.context is not contexts.current:
            connection.context = contexts.current

    def build(current: TlsFiles) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(current.cert, current.key)
        if current.client_ca is not None:
            context.load_verify_locations(cafile=current.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        context.sni_callback = on_hello
        return context

    contexts = _Reread(files, build)
    return contexts.current
