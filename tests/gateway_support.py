"""Helpers for tests that talk to a gateway: a stub on a loopback channel, metrics read back."""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import AsyncIterator

import grpc
from prometheus_client.parser import text_string_to_metric_families

from service.api.clip.v1 import clip_pb2_grpc


@contextlib.asynccontextmanager
async def stub_for(port: int) -> AsyncIterator[clip_pb2_grpc.ClipServiceStub]:
    """A ClipService stub on a loopback channel."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield clip_pb2_grpc.ClipServiceStub(channel)


def scrape(port: int) -> dict[str, float]:
    """`/metrics` parsed with prometheus-client's parser → {'name{k="v",...}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def sample(samples: dict[str, float], name: str, **labels: str) -> float:
    """One value from `scrape()`; 0 when the series does not exist yet."""
    key = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return samples.get(f"{name}{{{key}}}", 0.0)
