"""grpc.health.v1 that tells the truth: SERVING only after a real forward pass works.

Every model is checked on its own: the service `clip.v1.ClipService/NAME` says whether
model NAME serves; `""` and `clip.v1.ClipService` say SERVING only when every model does.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from service.core.models import ModelRegistry

_LOGGER = logging.getLogger(__name__)
SERVICE_NAMES = ("", "clip.v1.ClipService")
#: Health service name of one model: `clip.v1.ClipService/NAME`.
MODEL_SERVICE_PREFIX = "clip.v1.ClipService/"
#: SERVING while the process runs, whatever the backend does: for liveness probes, so a
#: Triton outage takes gateways out of rotation instead of restarting them.
LIVENESS_SERVICE = "liveness"


class HealthMonitor:
    """Polls the backend; flips health to SERVING after a warm-up inference succeeds."""

    def __init__(
        self, servicer: health.aio.HealthServicer, models: ModelRegistry, interval_s: float = 1.0
    ) -> None:
        self.servicer = servicer
        self._models = models
        self._interval_s = interval_s
        self.serving = False
        #: Per model name: whether it serves (ready and warmed up).
        self.models_serving = dict.fromkeys(models.names, False)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def _set(self, serving: bool, models: dict[str, bool]) -> None:
        if serving != self.serving:
            _LOGGER.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving
        self.models_serving = models
        for name in SERVICE_NAMES:
            await self.servicer.set(name, _status(serving))
        for name, ok in models.items():
            await self.servicer.set(MODEL_SERVICE_PREFIX + name, _status(ok))

    async def _check_model(self, name: str) -> bool:
        embedder = self._models.get(name).embedder
        try:
            ok = await asyncio.wait_for(embedder.ready(), 5.0)
            if ok and not self.models_serving.get(name):
                # Ready is not enough: only a forward pass proves inference works.
                await asyncio.wait_for(embedder.warmup(), 60.0)
        except Exception as exc:
            _LOGGER.warning("health check of model %s failed: %s", name, exc)
            ok = False
        return ok

    async def check_once(self) -> bool:
        """One probe of every model: readiness, plus a tiny forward pass while not serving."""
        if self._stopping:
            return False
        names = self._models.names
        answers = await asyncio.gather(*(self._check_model(n) for n in names))
        models = dict(zip(names, answers, strict=True))
        ok = all(answers)
        if not self._stopping:
            await self._set(ok, models)
        return ok

    async def _loop(self) -> None:
        while not self._stopping:
            await self.check_once()
            await asyncio.sleep(self._interval_s)

    async def start(self) -> None:
        """Report NOT_SERVING now, then keep probing in the background."""
        await self.servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._set(False, dict.fromkeys(self._models.names, False))
        self._task = asyncio.create_task(self._loop(), name="health-monitor")

    async def shutdown(self) -> None:
        """NOT_SERVING for good (graceful shutdown has begun)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        self.serving = False
        await self.servicer.enter_graceful_shutdown()


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
