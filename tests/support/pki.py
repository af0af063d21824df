"""Test certificates made with the real `openssl` binary: a CA and what it signs."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str = "ca") -> Path:
    """A self-signed CA: `<name>.pem` and `<name>.key` in `directory`; returns the PEM."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN=test-{name}",
        "-keyout", str(directory / f"{name}.key"), "-out", str(directory / f"{name}.pem"),
    )  # fmt: skip
    return directory / f"{name}.pem"


def issue(directory: Path, ca: Path, name: str, extension: str) -> tuple[Path, Path]:
    """A certificate for `name` signed by `ca` (with one `extension` line): (pem, key)."""
    key, csr, pem = (directory / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem"))
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    ext = directory / f"{name}.ext"
    ext.write_text(extension + "\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key")),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(pem),
    )  # fmt: skip
    return pem, key


SERVER_NAMES = "subjectAltName=DNS:localhost,IP:127.0.0.1"
CLIENT_AUTH = "extendedKeyUsage=clientAuth"
