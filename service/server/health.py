"""grpc.health.v1 that tells the truth: SERVING only after a real forward pass works."""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from service.core.embedder import Embedder

_LOGGER = logging.getLogger(__name__)
SERVICE_NAMES = ("", "clip.v1.ClipService")
#: SERVING while the process runs, whatever the backend does: for liveness probes, so a
#: Triton outage takes gateways out of rotation instead of restarting them.
LIVENESS_SERVICE = "liveness"


class HealthMonitor:
    """Polls the backend; flips health to SERVING after a warm-up inference succeeds."""

    def __init__(
        self, servicer: health.aio.HealthServicer, embedder: Embedder, interval_s: float = 1.0
    ) -> None:
        self.servicer = servicer
        self._embedder = embedder
        self._interval_s = interval_s
        self.serving = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def _set(self, serving: bool) -> None:
        if serving != self.serving:
            _LOGGER.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in SERVICE_NAMES:
            await self.servicer.set(name, status)

    async def check_once(self) -> bool:
        """One probe: readiness, plus a tiny forward pass while not yet serving."""
        if self._stopping:
            return False
        try:
            ok = await asyncio.wait_for(self._embedder.ready(), 5.0)
            if ok and not self.serving:
                # Ready is not enough: only a forward pass proves inference works.
                await asyncio.wait_for(self._embedder.warmup(), 60.0)
        except Exception as exc:
            _LOGGER.warning("health check failed: %s", exc)
            ok = False
        if not self._stopping:
            await self._set(ok)
        return ok

    async def _loop(self) -> None:
        while not self._stopping:
            await self.check_once()
            await asyncio.sleep(self._interval_s)

    async def start(self) -> None:
        """Report NOT_SERVING now, then keep probing in the background."""
        await self.servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._set(False)
        self._task = asyncio.create_task(self._loop(), name="health-monitor")

    async def shutdown(self) -> None:
        """NOT_SERVING for good (graceful shutdown has begun)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        self.serving = False
        await self.servicer.enter_graceful_shutdown()
