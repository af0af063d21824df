"""Helpers for tests that talk to a gateway: a stub on a loopback channel, metrics read back."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from service.api.clip.v1 import clip_pb2_grpc


@contextlib.asynccontextmanager
async def stub_for(port: int) -> AsyncIterator[clip_pb2_grpc.ClipServiceStub]:
    """A ClipService stub on a loopback channel."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield clip_pb2_grpc.ClipServiceStub(channel)
