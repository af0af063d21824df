"""Rotation without restarts: a rewritten API-key file and new TLS certificates take effect.

Kubernetes updates a mounted Secret by swapping a symlink; both are re-read on change
(issue 14, item 5). Real gateway, real gRPC, real `openssl` certificates.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.processes.gateway import gateway_settings, running_gateway
from tests.support.models import ExportedModel
from tests.support.pki import CLIENT_AUTH, SERVER_NAMES, issue, make_ca

pytestmark = pytest.mark.integration

OLD_KEY = "old-key-0123456789"
NEW_KEY = "new-key-9876543210"
# Rotation is checked once a second; 30 s is far past that even on a loaded machine.
ROTATION_DEADLINE_S = 30.0


def _swap_symlink(link: Path, target: Path) -> None:
    """What the kubelet does to a mounted Secret: point the link elsewhere, atomically."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


async def _code(channel: grpc.aio.Channel, key: str) -> grpc.StatusCode:
    stub = clip_pb2_grpc.ClipServiceStub(channel)
    try:
        await stub.EmbedText(
            clip_pb2.EmbedTextRequest(texts=["rotation"]),
            metadata=(("authorization", f"Bearer {key}"),),
            timeout=20,
        )
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_a_rotated_api_key_file_takes_effect_without_a_restart(
    demo_model: ExportedModel, tmp_path: Path
) -> None:
    (tmp_path / "v1").write_text(f"{OLD_KEY}\n")
    (tmp_path / "v2").write_text(f"# rotated\n{NEW_KEY}\n")
    keys = tmp_path / "keys"
    _swap_symlink(keys, tmp_path / "v1")
    settings = gateway_settings(demo_model.repository, api_keys_file=keys)
    async with running_gateway(settings) as gw:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
            assert await _code(channel, OLD_KEY) == grpc.StatusCode.OK
            assert await _code(channel, NEW_KEY) == grpc.StatusCode.UNAUTHENTICATED
            _swap_symlink(keys, tmp_path / "v2")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + ROTATION_DEADLINE_S
            while await _code(channel, NEW_KEY) != grpc.StatusCode.OK:
                assert loop.time() < deadline, "the new key was never accepted"
                await asyncio.sleep(0.1)
            assert await _code(channel, OLD_KEY) == grpc.StatusCode.UNAUTHENTICATED
            # A file missing mid-swap keeps the last good keys (never opens the door).
            (tmp_path / "v2").unlink()
            await asyncio.sleep(1.2)
            assert await _code(channel, NEW_KEY) == grpc.StatusCode.OK
            assert await _code(channel, "") == grpc.StatusCode.UNAUTHENTICATED


async def test_new_tls_certificates_are_used_without_a_restart(
    demo_model: ExportedModel, tmp_path: Path
) -> None:
    first_ca, second_ca = make_ca(tmp_path / "a", "ca"), make_ca(tmp_path / "b", "ca")
    cert_a, key_a = issue(tmp_path / "a", first_ca, "server", SERVER_NAMES)
    cert_b, key_b = issue(tmp_path / "b", second_ca, "server", SERVER_NAMES)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _swap_symlink(cert, cert_a)
    _swap_symlink(key, key_a)
    settings = gateway_settings(demo_model.repository, tls_cert=cert, tls_key=key)
    async with running_gateway(settings) as gw:
        target = f"127.0.0.1:{gw.port}"

        roots = {first_ca: first_ca.read_bytes(), second_ca: second_ca.read_bytes()}

        async def trusted_by(ca: Path) -> grpc.StatusCode:
            creds = grpc.ssl_channel_credentials(root_certificates=roots[ca])
            async with grpc.aio.secure_channel(target, creds) as channel:
                return await _code(channel, "")

        assert await trusted_by(first_ca) == grpc.StatusCode.OK
        assert await trusted_by(second_ca) == grpc.StatusCode.UNAVAILABLE
        _swap_symlink(key, key_b)
        _swap_symlink(cert, cert_b)
        # Each new connection is a new handshake: the new certificate is served at once.
        assert await trusted_by(second_ca) == grpc.StatusCode.OK
        assert await trusted_by(first_ca) == grpc.StatusCode.UNAVAILABLE


def _https_status(port: int, context: ssl.SSLContext) -> int | str:
    """GET /health over a new HTTPS connection: the status, or why the handshake failed."""
    request = urllib.request.Request(f"https://127.0.0.1:{port}/health")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return int(response.status)
    except urllib.error.URLError as exc:
        return type(exc.reason).__name__


async def test_the_http_port_uses_new_certificates_and_client_cas_without_a_restart(
    demo_model: ExportedModel, tmp_path: Path
) -> None:
    """The HTTP API's TLS follows the same files: a new server certificate (another CA)
    and a new client CA take effect at the next handshake; a file missing mid-swap keeps
    the last good ones."""
    first_ca, second_ca = make_ca(tmp_path / "a", "ca"), make_ca(tmp_path / "b", "ca")
    cert_a, key_a = issue(tmp_path / "a", first_ca, "server", SERVER_NAMES)
    cert_b, key_b = issue(tmp_path / "b", second_ca, "server", SERVER_NAMES)
    client_a, client_key_a = issue(tmp_path / "a", first_ca, "client", CLIENT_AUTH)
    client_b, client_key_b = issue(tmp_path / "b", second_ca, "client", CLIENT_AUTH)
    cert, key, client_ca = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    for link, target in ((cert, cert_a), (key, key_a), (client_ca, first_ca)):
        _swap_symlink(link, target)

    def caller(ca: Path, client: Path, client_key: Path) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(client), str(client_key))
        return context

    old_caller = caller(first_ca, client_a, client_key_a)
    new_caller = caller(second_ca, client_b, client_key_b)
    settings = gateway_settings(
        demo_model.repository, tls_cert=cert, tls_key=key, tls_client_ca=client_ca
    )
    async with running_gateway(settings) as gw:
        port = gw.http_port
        assert await asyncio.to_thread(_https_status, port, old_caller) == 200
        assert await asyncio.to_thread(_https_status, port, new_caller) != 200
        _swap_symlink(key, key_b)
        _swap_symlink(cert, cert_b)
        _swap_symlink(client_ca, second_ca)
        # Each new connection is a new handshake: the new files are used at once.
        assert await asyncio.to_thread(_https_status, port, new_caller) == 200
        assert await asyncio.to_thread(_https_status, port, old_caller) != 200
        # Mid-swap (a file missing): the last good certificate stays.
        cert.unlink()
        assert await asyncio.to_thread(_https_status, port, new_caller) == 200
