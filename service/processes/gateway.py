"""A gateway on loopback and free ports, for tests and benchmarks: in a child process or here.

    with GatewayProcess(repository, local_cache_items=0) as gateway:   # `clipsvc serve`
        channel = grpc.insecure_channel(gateway.target)                 # once SERVING

    async with running_gateway(gateway_settings(repository)) as gateway:  # this process
        ...

A child process has its CPU and memory to itself (its RSS is the gateway's) and does
not share the caller's GIL; one in this process can be reached into (profiling, fault
injection).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.processes.child_server import ChildServer

# The server is imported where an in-process gateway is built: a child-process
# gateway needs none of it in this process.
if TYPE_CHECKING:
    from service.server.app import Gateway
    from service.settings import Settings

# The folder that holds the `service` package: a child started there with `-m` runs
# this very code, not another copy installed elsewhere.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def serving(target: str, timeout_s: float = 1.0) -> bool:
    """One grpc.health.v1 check: True when the server says SERVING (model loaded, warm)."""
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(target: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Block until the gateway at `target` (started elsewhere) is SERVING."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"gateway at {target} exited while starting")
        if serving(target):
            return
        time.sleep(0.2)  # poll interval, not a wait for readiness
    raise TimeoutError(f"gateway at {target} not SERVING within {timeout_s}s")


class GatewayProcessError(RuntimeError):
    """The gateway process did not start or did not become SERVING in time."""


class GatewayProcess(ChildServer):
    """`python -m service.cli serve` on loopback, in its own process group, on free ports.

    `settings` are `serve` flags by field name (`local_cache_items=0` →
    `--local-cache-items 0`); the caller's CLIP_* variables are left out so that they
    cannot change them silently. Ready means SERVING on grpc.health.v1.
    """

    name = "gateway"
    error = GatewayProcessError
    port_names = ("grpc", "metrics", "http")
    poll_interval_s = 0.2
    # What a gateway started for a measurement or a test wants unless told otherwise.
    defaults: ClassVar[Mapping[str, object]] = {"shutdown_grace_s": 2, "log_level": "WARNING"}

    def __init__(
        self,
        repository: Path,
        *,
        log_name: str = "gateway",
        startup_timeout_s: float = 300.0,
        stop_grace_s: float = 30.0,
        **settings: object,
    ) -> None:
        """Prepare (not start); the log goes to `<temporary folder>/<log_name>.log`."""
        super().__init__(
            log_name=log_name, startup_timeout_s=startup_timeout_s, stop_grace_s=stop_grace_s
        )
        self.repository = Path(repository)
        self.settings = settings

    @property
    def port(self) -> int:
        """The gRPC port; 0 before the first start."""
        return self.bound_port("grpc") if self._ports is not None else 0

    @property
    def metrics_port(self) -> int:
        """The /metrics port; 0 before the first start."""
        return self.bound_port("metrics") if self._ports is not None else 0

    @property
    def http_port(self) -> int:
        """The HTTP API's port; 0 before the first start."""
        return self.bound_port("http") if self._ports is not None else 0

    @property
    def target(self) -> str:
        """`127.0.0.1:PORT`."""
        return f"{self.host}:{self.port}"

    def command(self, ports: Mapping[str, int]) -> list[str]:
        """The `serve` command line with every setting as a flag."""
        flags = {
            **self.defaults,
            **self.settings,
            "host": self.host,
            "port": ports["grpc"],
            "metrics_port": ports["metrics"],
            "http_port": ports["http"],
            "model_repository": self.repository,
        }
        command = [sys.executable, "-m", "service.cli", "serve"]
        for name, value in flags.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                command.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, tuple | list):
                command += [flag, ",".join(str(v) for v in value)]
            else:
                command += [flag, str(value)]
        return command

    def environment(self) -> dict[str, str]:
        """This process's environment without CLIP_* variables, offline."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_")}
        env["HF_HUB_OFFLINE"] = "1"
        return env

    def cwd(self) -> Path:
        """The folder holding the `service` package, so `-m service.cli` runs this code."""
        return _PACKAGE_ROOT

    def is_ready(self, timeout_s: float = 1.0) -> bool:
        """SERVING on grpc.health.v1."""
        return self._ports is not None and serving(self.target, timeout_s)


def gateway_settings(repository: Path, **overrides: Any) -> Settings:
    """Loopback, free ports, a short shutdown: the settings of an in-process gateway."""
    from service.settings import Settings

    base = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "http_port": 0,
        "model_repository": repository,
        "shutdown_grace_s": 5.0,
    }
    base.update(overrides)
    return Settings(**base)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, *, tracer_provider: Any = None
) -> AsyncIterator[Gateway]:
    """A gateway in this process: started, SERVING inside the block, stopped after it
    (`tracer_provider`: as `build_gateway`'s, an SDK provider a test traces into)."""
    from service.wiring import build_gateway

    gateway = build_gateway(settings, tracer_provider=tracer_provider)
    await gateway.start()
    try:
        await gateway.wait_until_serving(120)
        yield gateway
    finally:
        await gateway.stop(1.0)
