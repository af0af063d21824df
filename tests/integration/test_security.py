"""API keys (constant-time, health stays open, refusals counted), TLS and mTLS, no leaks."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample, scrape
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration

KEY_A = "key-alpha-0123456789"
KEY_B = "key-bravo-9876543210"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    for name, extension in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.csr"),
        )
        (d / f"{name}.ext").write_text(extension + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(d / f"{name}.ext"),
            "-out",
            str(d / f"{name}.pem"),
        )
    return {p.stem + p.suffix: p for p in d.iterdir()}


async def _embed(channel: grpc.aio.Channel, key: str | None = None) -> grpc.StatusCode:
    stub = clip_pb2_grpc.ClipServiceStub(channel)
    metadata = (("authorization", f"Bearer {key}"),) if key is not None else None
    try:
        await stub.EmbedText(
            clip_pb2.EmbedTextRequest(texts=["secret payload"]), metadata=metadata, timeout=20
        )
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_api_keys(
    demo_model: ExportedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# one key per line\n{KEY_B}\n")
    settings = gateway_settings(demo_model.repository, api_keys=(KEY_A,), api_keys_file=keys_file)
    caplog.set_level(logging.DEBUG)
    async with running_gateway(settings) as gw:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
            assert await _embed(channel) == grpc.StatusCode.UNAUTHENTICATED
            assert await _embed(channel, "wrong-key") == grpc.StatusCode.UNAUTHENTICATED
            assert await _embed(channel, KEY_A[:-1]) == grpc.StatusCode.UNAUTHENTICATED
            assert await _embed(channel, "") == grpc.StatusCode.UNAUTHENTICATED
            assert await _embed(channel, KEY_A) == grpc.StatusCode.OK
            assert await _embed(channel, KEY_B) == grpc.StatusCode.OK
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest())  # no key: still open
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        samples = scrape(gw.metrics_port)
    assert sample(samples, "clip_auth_failures_total") == 4
    assert sample(samples, "clip_requests_total", method="EmbedText", code="UNAUTHENTICATED") == 4
    logged = caplog.text
    assert KEY_A not in logged and KEY_B not in logged and "secret payload" not in logged


async def test_tls_and_mutual_tls(demo_model: ExportedModel, pki: dict[str, Path]) -> None:
    ca = pki["ca.pem"].read_bytes()
    settings = gateway_settings(
        demo_model.repository, tls_cert=pki["server.pem"], tls_key=pki["server.key"]
    )
    async with running_gateway(settings) as gw:
        target = f"127.0.0.1:{gw.port}"
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(target, creds) as channel:
            assert await _embed(channel) == grpc.StatusCode.OK
        async with grpc.aio.insecure_channel(target) as channel:
            assert await _embed(channel) == grpc.StatusCode.UNAVAILABLE

    mutual = settings.replace(tls_client_ca=pki["ca.pem"])
    async with running_gateway(mutual) as gw:
        target = f"127.0.0.1:{gw.port}"
        anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(target, anonymous) as channel:
            assert await _embed(channel) == grpc.StatusCode.UNAVAILABLE
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=pki["client.key"].read_bytes(),
            certificate_chain=pki["client.pem"].read_bytes(),
        )
        async with grpc.aio.secure_channel(target, with_cert) as channel:
            assert await _embed(channel) == grpc.StatusCode.OK
