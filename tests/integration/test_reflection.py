"""gRPC reflection as `grpc.reflection.v1` and `grpc.reflection.v1alpha`, through a real
reflection client of another implementation: `buf curl` (Go), told which protocol to
speak, lists the services, describes every method (the v1 service's own descriptor
included) and calls an RPC whose schema it only learned by reflection."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from service.server.app import Gateway
from tests.support.paths import REPO_ROOT

pytestmark = pytest.mark.integration

LOCAL_BUF = REPO_ROOT / ".tools" / "buf" / "buf"
PROTOCOLS = ("grpc-v1", "grpc-v1alpha")
SERVICES = {
    "clip.v1.ClipService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


def _buf() -> str:
    """`$CLIP_BUF`, else `.tools/buf/buf` (installed by scripts/install_buf.sh when missing)."""
    if os.environ.get("CLIP_BUF"):
        return os.environ["CLIP_BUF"]
    if not LOCAL_BUF.exists():
        subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "install_buf.sh")], check=True, timeout=300
        )
    return str(LOCAL_BUF)


async def _buf_curl(gw: Gateway, protocol: str, *args: str, path: str = "") -> str:
    process = await asyncio.create_subprocess_exec(
        _buf(),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--reflect-protocol",
        protocol,
        *args,
        f"http://127.0.0.1:{gw.port}{path}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "BUF_CACHE_DIR": str(Path(REPO_ROOT / ".tools" / "buf" / "cache"))},
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, f"buf curl {protocol} {args}: {err.decode()}"
    return out.decode()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_both_reflection_protocols_list_every_service(
    gateway: Gateway, protocol: str
) -> None:
    listed = (await _buf_curl(gateway, protocol, "--list-services")).split()
    assert set(listed) == SERVICES


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_both_describe_every_method_including_the_v1_service_itself(
    gateway: Gateway, protocol: str
) -> None:
    # Every service's file is fetched and parsed: v1's descriptor must exist to list it.
    methods = set((await _buf_curl(gateway, protocol, "--list-methods")).split())
    assert {
        "clip.v1.ClipService/EmbedText",
        "clip.v1.ClipService/EmbedStream",
        "grpc.health.v1.Health/Check",
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    } <= methods


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_call_whose_schema_came_by_reflection_works(
    gateway: Gateway, protocol: str
) -> None:
    answer = json.loads(
        await _buf_curl(
            gateway,
            protocol,
            "--data",
            '{"texts": ["a red circle"], "format": "VECTOR_FORMAT_UBINARY"}',
            path="/clip.v1.ClipService/EmbedText",
        )
    )
    (embedding,) = answer["embeddings"]
    assert embedding["dim"] == 64 and embedding["format"] == "VECTOR_FORMAT_UBINARY"
    assert len(embedding["packed"]) == 12  # 8 bytes in base64


def test_the_buf_binary_runs() -> None:
    buf = _buf()
    assert shutil.which(buf) or Path(buf).is_file()
    done = subprocess.run([buf, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip()
