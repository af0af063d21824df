"""`--health-port` (README, "Probes" and "Health"): a plaintext port serving only
grpc.health.v1, outside TLS and API keys, so kubelet probes (plaintext, no keys) get
true answers from a gateway whose gRPC port has TLS and keys on.

Real gateway with real `openssl` certificates, real gRPC over loopback.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.processes.gateway import gateway_settings, running_gateway
from tests.support.models import ExportedModel
from tests.support.pki import SERVER_NAMES, issue, make_ca

pytestmark = pytest.mark.integration

KEY = "probe-test-key-0123456789"
SERVING = health_pb2.HealthCheckResponse.SERVING


async def _check(channel: grpc.aio.Channel, service: str) -> int | grpc.StatusCode:
    """A health check's status, or the gRPC code that ended the call."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=20
        )
    except grpc.aio.AioRpcError as err:
        return err.code()
    return reply.status


async def _embed(channel: grpc.aio.Channel, key: str | None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {key}"),) if key is not None else None
    try:
        await clip_pb2_grpc.ClipServiceStub(channel).EmbedText(
            clip_pb2.EmbedTextRequest(texts=["a red circle"]), metadata=metadata, timeout=20
        )
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_the_health_port_answers_plaintext_probes_without_a_key_while_tls_and_keys_guard(
    demo_model: ExportedModel, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path, "ca")
    cert, key = issue(tmp_path, ca, "server", SERVER_NAMES)
    settings = gateway_settings(
        demo_model.repository, tls_cert=cert, tls_key=key, api_keys=(KEY,), health_port=0
    )
    async with running_gateway(settings) as gw:
        assert gw.health_port and gw.health_port != gw.port
        main = f"127.0.0.1:{gw.port}"
        tls = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        # The gRPC port: TLS only, and every ClipService call needs the key.
        async with grpc.aio.insecure_channel(main) as plaintext:
            assert await _check(plaintext, "") == grpc.StatusCode.UNAVAILABLE
            assert await _embed(plaintext, KEY) == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(main, tls) as secure:
            assert await _embed(secure, None) == grpc.StatusCode.UNAUTHENTICATED
            assert await _embed(secure, KEY) == grpc.StatusCode.OK
        # The health port: plaintext, no key, the same answers as the gRPC port's health.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.health_port}") as probe:
            assert await _check(probe, "") == SERVING  # readiness
            assert await _check(probe, "liveness") == SERVING
            assert await _check(probe, "no-such-service") == grpc.StatusCode.NOT_FOUND
            # Only grpc.health.v1 is served there: no way around the key or TLS.
            assert await _embed(probe, KEY) == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.secure_channel(main, tls) as secure:
            assert await _check(secure, "") == SERVING
            assert await _check(secure, "no-such-service") == grpc.StatusCode.NOT_FOUND
