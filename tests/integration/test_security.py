"""API keys (every RPC kind, health and reflection open, refusals counted), TLS and mTLS
(a client of another CA refused), and logs that never hold keys or payloads."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.processes.gateway import GatewayProcess, gateway_settings, running_gateway
from service.processes.metric_samples import sample, scrape
from tests.support.models import ExportedModel
from tests.support.pki import CLIENT_AUTH, SERVER_NAMES, issue, make_ca
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

KEY_A = "key-alpha-0123456789"
KEY_B = "key-bravo-9876543210"
PAYLOAD = "secret payload 5c1e"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA with a server and a client certificate, and a client of another CA."""
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "ca")
    server, server_key = issue(d, ca, "server", SERVER_NAMES)
    client, client_key = issue(d, ca, "client", CLIENT_AUTH)
    other_ca = make_ca(d, "other-ca")
    stranger, stranger_key = issue(d, other_ca, "stranger", CLIENT_AUTH)
    return {
        "ca.pem": ca,
        "server.pem": server,
        "server.key": server_key,
        "client.pem": client,
        "client.key": client_key,
        "stranger.pem": stranger,
        "stranger.key": stranger_key,
    }


def _auth(key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {key}"),) if key is not None else None


async def _embed(channel: grpc.aio.Channel, key: str | None = None) -> grpc.StatusCode:
    stub = clip_pb2_grpc.ClipServiceStub(channel)
    try:
        await stub.EmbedText(
            clip_pb2.EmbedTextRequest(texts=[PAYLOAD]), metadata=_auth(key), timeout=20
        )
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def _stream(channel: grpc.aio.Channel, key: str) -> list[clip_pb2.StreamResponse]:
    """EmbedStream with two items; the answers."""

    async def items() -> AsyncIterator[clip_pb2.StreamRequest]:
        yield clip_pb2.StreamRequest(id="a", text=PAYLOAD)
        yield clip_pb2.StreamRequest(id="b", text="a red circle")

    call = clip_pb2_grpc.ClipServiceStub(channel).EmbedStream(
        items(), metadata=_auth(key), timeout=20
    )
    return [answer async for answer in call]


async def _stream_status(channel: grpc.aio.Channel, key: str | None) -> grpc.StatusCode:
    """How the server ends an EmbedStream that is opened and closed without items.

    No items: grpc's client reports INTERNAL ("Internal error from Core") instead of the
    server's status when the server ends a call while the client is still writing to it,
    as a refused stream does; without writes the server's own status comes through.
    """
    call = clip_pb2_grpc.ClipServiceStub(channel).EmbedStream(metadata=_auth(key), timeout=20)
    await call.done_writing()
    return await call.code()


async def _reflected_services(channel: grpc.aio.Channel) -> list[str]:
    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: list[str] = []
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    async for reply in stub.ServerReflectionInfo(ask(), timeout=20):
        names += [s.name for s in reply.list_services_response.service]
    return names


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
            # The streaming RPC is guarded too (a server that let it through would end this
            # empty stream with OK).
            assert await _stream_status(channel, None) == grpc.StatusCode.UNAUTHENTICATED
            assert await _stream_status(channel, "wrong-key") == grpc.StatusCode.UNAUTHENTICATED
            assert await _stream_status(channel, KEY_A) == grpc.StatusCode.OK
            answers = await _stream(channel, KEY_B)
            assert sorted(a.id for a in answers) == ["a", "b"]
            assert all(a.WhichOneof("result") == "embedding" for a in answers)
            # Health and reflection stay open, without a key.
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=20)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            services = await _reflected_services(channel)
            assert "clip.v1.ClipService" in services and "grpc.health.v1.Health" in services

        def refusals() -> tuple[float, float, float]:
            samples = scrape(gw.metrics_port)
            return (
                sample(samples, "clip_auth_failures_total"),
                sample(samples, "clip_requests_total", method="EmbedText", code="UNAUTHENTICATED"),
                sample(
                    samples, "clip_requests_total", method="EmbedStream", code="UNAUTHENTICATED"
                ),
            )

        # Counted once each, as the interceptor finishes (polled: after the answer).
        counted = await eventually(
            refusals,
            lambda c: c[0] >= 6 and c[1] >= 4 and c[2] >= 2,
            what="the refusals counted",
            blocking=True,
        )
    assert counted == (6, 4, 2)
    logged = caplog.text
    # The log was captured (so the next check can fail) ...
    assert "listening on" in logged and "health: SERVING" in logged
    # ... and holds neither keys nor payloads.
    for secret in (KEY_A, KEY_B, PAYLOAD, "wrong-key"):
        assert secret not in logged


def test_the_serve_log_never_holds_keys_or_payloads(
    demo_model: ExportedModel, tmp_path: Path
) -> None:
    """`clipsvc serve` at DEBUG, keys from a flag and a file, calls right and wrong."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{KEY_B}\n")
    with GatewayProcess(
        demo_model.repository, api_keys=KEY_A, api_keys_file=keys_file, log_level="DEBUG"
    ) as gateway:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = clip_pb2_grpc.ClipServiceStub(channel)
            for key, expected in (
                (KEY_A, grpc.StatusCode.OK),
                (KEY_B, grpc.StatusCode.OK),
                ("wrong-key", grpc.StatusCode.UNAUTHENTICATED),
                (None, grpc.StatusCode.UNAUTHENTICATED),
            ):
                code = grpc.StatusCode.OK
                try:
                    stub.EmbedText(
                        clip_pb2.EmbedTextRequest(texts=[PAYLOAD]), metadata=_auth(key), timeout=20
                    )
                except grpc.RpcError as err:
                    code = err.code()
                assert code == expected, key
            with pytest.raises(grpc.RpcError) as refused:  # an INVALID_ARGUMENT path as well
                stub.EmbedImage(
                    clip_pb2.EmbedImageRequest(images=[PAYLOAD.encode()]),
                    metadata=_auth(KEY_A),
                    timeout=20,
                )
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        gateway.stop()
        log = gateway.log_tail(10_000_000)
    # What should be there is: the resolved settings with the keys masked, start, stop.
    assert '"api_keys": "<1 keys>"' in log, log[-3000:]
    assert f'"api_keys_file": "{keys_file}"' in log
    assert "listening on" in log and "health: SERVING" in log and "stopped" in log
    for secret in (KEY_A, KEY_B, PAYLOAD, "wrong-key"):
        assert secret not in log


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

        def client(name: str | None) -> grpc.ChannelCredentials:
            if name is None:
                return grpc.ssl_channel_credentials(root_certificates=ca)
            return grpc.ssl_channel_credentials(
                root_certificates=ca,
                private_key=pki[f"{name}.key"].read_bytes(),
                certificate_chain=pki[f"{name}.pem"].read_bytes(),
            )

        # No certificate, and a certificate the server's CA did not sign: both refused.
        for name in (None, "stranger"):
            async with grpc.aio.secure_channel(target, client(name)) as channel:
                assert await _embed(channel) == grpc.StatusCode.UNAVAILABLE, name
        async with grpc.aio.secure_channel(target, client("client")) as channel:
            assert await _embed(channel) == grpc.StatusCode.OK
