"""README ("Auth"): "a configured but empty [API key] file refuses every call" (fail
closed): gRPC answers UNAUTHENTICATED and HTTP 401, whatever key a caller sends, until
the file holds a key; emptied again, it refuses again.

Real gateway, real gRPC and HTTP over loopback, a real key file re-read on change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample, scrape
from service.server.app import Gateway
from tests.support.http_json import http_json
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration

KEY = "key-written-later-0123456789"
# Keys a caller might try against an empty file: none, an empty one, any string.
ATTEMPTS = (None, "", "some-key", "#", KEY)
# The key file is looked at once a second at most; this is far past that.
REREAD_DEADLINE_S = 60.0


def _grpc_calls(stub: clip_pb2_grpc.ClipServiceStub) -> dict[str, Callable[..., Awaitable[Any]]]:
    """One of each kind of ClipService call, as `call(metadata)`."""
    return {
        "EmbedText": lambda md: stub.EmbedText(
            clip_pb2.EmbedTextRequest(texts=["a red circle"]), metadata=md, timeout=30
        ),
        "Classify": lambda md: stub.Classify(
            clip_pb2.ClassifyRequest(images=[b"never decoded"], labels=["a", "b"]),
            metadata=md,
            timeout=30,
        ),
        "GetModelInfo": lambda md: stub.GetModelInfo(
            clip_pb2.GetModelInfoRequest(), metadata=md, timeout=30
        ),
        "ListModels": lambda md: stub.ListModels(
            clip_pb2.ListModelsRequest(), metadata=md, timeout=30
        ),
    }


async def _grpc_code(call: Callable[..., Awaitable[Any]], key: str | None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {key}"),) if key is not None else None
    try:
        await call(metadata)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def _stream_code(stub: clip_pb2_grpc.ClipServiceStub, key: str | None) -> grpc.StatusCode:
    """An EmbedStream opened and closed without items (see test_security.py for why)."""
    metadata = (("authorization", f"Bearer {key}"),) if key is not None else None
    call = stub.EmbedStream(metadata=metadata, timeout=30)
    await call.done_writing()
    return await call.code()


async def _http_statuses(gw: Gateway, key: str | None) -> list[tuple[int, Any]]:
    port = gw.http_port
    assert port
    return [
        await asyncio.to_thread(http_json, port, "/v1/embeddings", {"input": "x"}, key=key),
        await asyncio.to_thread(http_json, port, "/v1/models", key=key),
    ]


async def _all_refused(gw: Gateway, stub: clip_pb2_grpc.ClipServiceStub) -> None:
    for key in ATTEMPTS:
        for name, call in _grpc_calls(stub).items():
            code = await _grpc_code(call, key)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, key, code)
        assert await _stream_code(stub, key) == grpc.StatusCode.UNAUTHENTICATED, key
        for status, answer in await _http_statuses(gw, key):
            assert status == 401, (key, status, answer)
            assert answer["error"]["code"] == "UNAUTHENTICATED"


async def test_an_empty_key_file_refuses_every_call_until_it_holds_a_key(
    demo_model: ExportedModel, tmp_path: Path
) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text("")
    settings = gateway_settings(demo_model.repository, api_keys_file=keys)
    async with running_gateway(settings) as gw:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
            stub = clip_pb2_grpc.ClipServiceStub(channel)
            await _all_refused(gw, stub)
            refusals = sample(scrape(gw.metrics_port), "clip_auth_failures_total")
            # gRPC: 4 unary + 1 stream, HTTP: 2 routes; for each attempted key.
            assert refusals == len(ATTEMPTS) * (4 + 1 + 2)

            # The file gets a key: that key now passes (the gateway itself serves) ...
            keys.write_text(f"{KEY}\n")
            embed = _grpc_calls(stub)["EmbedText"]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + REREAD_DEADLINE_S
            while await _grpc_code(embed, KEY) != grpc.StatusCode.OK:
                assert loop.time() < deadline, "the key written into the file never passed"
                await asyncio.sleep(0.1)  # poll interval; the file is checked once a second
            for status, _ in await _http_statuses(gw, KEY):
                assert status == 200
            assert await _grpc_code(embed, "some-key") == grpc.StatusCode.UNAUTHENTICATED

            # ... and emptied again (only a comment left), it refuses every call again.
            keys.write_text("# no keys\n\n")
            deadline = loop.time() + REREAD_DEADLINE_S
            while await _grpc_code(embed, KEY) != grpc.StatusCode.UNAUTHENTICATED:
                assert loop.time() < deadline, "the emptied file never took effect"
                await asyncio.sleep(0.1)
            await _all_refused(gw, stub)
