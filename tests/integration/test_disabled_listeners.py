"""`--http-port -1` and `--metrics-port -1` (README, HTTP API and settings table): the
listener is disabled, nothing is bound for it. The flags are parsed as `clipsvc serve`
parses them; the ports the gateway's process listens on are read from /proc.

Real gateways in this process, started and stopped by the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.api.clip.v1 import clip_pb2
from service.cli import build_parser
from service.processes.gateway import running_gateway
from service.settings import Settings
from tests.support.gateway import stub_for
from tests.support.listening import listening_ports
from tests.support.models import ExportedModel
from tests.support.polling import eventually

pytestmark = pytest.mark.integration


def _serve_settings(repository: Path, *flags: str) -> Settings:
    """`clipsvc serve` on loopback and a free gRPC port, plus `flags`, no CLIP_* variables."""
    loopback = ["--host", "127.0.0.1", "--port", "0"]
    args = build_parser().parse_args(
        ["serve", "--model-repository", str(repository), *loopback, *flags]
    )
    return Settings.from_sources(args, environ={})


async def _nothing_left_listening(before: set[int]) -> None:
    """The stopped gateway's listeners are closed (the timeout only catches a hang)."""
    await eventually(listening_ports, lambda now: now <= before, what="the listeners closed")


async def test_http_and_metrics_ports_minus_one_bind_nothing(demo_model: ExportedModel) -> None:
    before = listening_ports()
    # Free ports for both (0): the control, which shows each listener where it is bound.
    enabled = _serve_settings(demo_model.repository, "--http-port", "0", "--metrics-port", "0")
    async with running_gateway(enabled) as gw:
        assert gw.http_port and gw.metrics_port
        assert listening_ports() - before == {gw.port, gw.http_port, gw.metrics_port}
    await _nothing_left_listening(before)

    disabled = _serve_settings(demo_model.repository, "--http-port", "-1", "--metrics-port", "-1")
    assert (disabled.http_port, disabled.metrics_port) == (-1, -1)
    async with running_gateway(disabled) as gw:
        assert gw.http_port is None and gw.metrics_port is None
        # Only the gRPC port is listening (--health-port is off by default too).
        assert listening_ports() - before == {gw.port}
        async with stub_for(gw.port) as stub:  # and the gateway serves
            answer = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=["x"]), timeout=60)
        assert len(answer.embeddings) == 1
    await _nothing_left_listening(before)
