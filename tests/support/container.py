"""The gateway image for tests: built with scripts/build_image.sh, run with podman or docker.

    tag = build_gateway_image("localhost/clip-service-gateway:test", "triton", repository)
    with GatewayContainer(tag, repository=mounted) as gateway:   # SERVING on loopback
        ...
        gateway.send_signal(signal.SIGTERM, group=False)          # the engine passes it on
        assert gateway.wait(60) == 0

Containers use the host's network with the gateway bound to 127.0.0.1 on free ports
(podman's default network would write the host's firewall tables), a read-only root
filesystem and the image's own non-root user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from service.processes.child_server import ChildServer
from service.processes.gateway import serving
from tests.support.paths import REPO_ROOT

BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_image.sh"
# podman as root here: runc, bounded ulimits (see scripts/build_image.sh).
_PODMAN = ["podman", "--runtime", "runc"]
_PODMAN_RUN = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]


def engine() -> list[str]:
    """The container engine's command: podman when installed, else a running docker."""
    if shutil.which("podman"):
        return list(_PODMAN)
    if (
        shutil.which("docker")
        and subprocess.run(
            ["docker", "info"], capture_output=True, check=False, timeout=30
        ).returncode
        == 0
    ):
        return ["docker"]
    pytest.fail("neither podman nor a running docker: `make system-deps` installs podman")


def engine_run() -> list[str]:
    """`<engine> run` with the flags every container here needs (podman: bounded ulimits)."""
    command = engine()
    return [*command, "run", *(_PODMAN_RUN if command[0] == "podman" else [])]


def build_gateway_image(
    tag: str, backend: str, repository: Path, *, timeout_s: float = 1800
) -> str:
    """`tag` built by scripts/build_image.sh (as `make image`) from `repository`; its log
    is in the failure message."""
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT), tag, backend, str(repository)],
        cwd=REPO_ROOT,
        env={**os.environ, "WHEEL_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"building {tag} failed ({done.returncode}):\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return tag


def image_size_bytes(tag: str) -> int:
    """The image's size as the engine reports it (all layers, uncompressed)."""
    out = subprocess.run(
        [*engine(), "image", "inspect", "--format", "{{.Size}}", tag],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return int(out.stdout.strip())


def readable_copy(repository: Path, into: Path) -> Path:
    """A copy of `repository` that the image's user (uid 10001) may read: pytest's
    temporary folders are private to root."""
    shutil.copytree(repository, into)
    for path in [into, *into.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return into


class GatewayContainerError(RuntimeError):
    """The gateway container did not start or did not become SERVING in time."""


class GatewayContainer(ChildServer):
    """`<engine> run` of a gateway image: read-only, non-root, host network, loopback ports.

    `repository` is mounted read-only over the image's model repository when given;
    `environment` adds CLIP_* settings. The engine's client is the child process: SIGTERM
    to it (`send_signal(..., group=False)`) reaches the gateway, and its exit code is the
    gateway's.
    """

    name = "gateway container"
    error = GatewayContainerError
    port_names = ("grpc", "metrics", "http")
    poll_interval_s = 0.1

    def __init__(
        self,
        image: str,
        *,
        repository: Path | None = None,
        environment: Mapping[str, str] | None = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        """Prepare (not start)."""
        super().__init__(startup_timeout_s=startup_timeout_s, stop_grace_s=30.0)
        self.image = image
        self.repository = repository
        self.settings = dict(environment or {})
        self.container_name = f"clip-gateway-test-{uuid.uuid4().hex[:12]}"
        self._engine = engine()

    @property
    def target(self) -> str:
        """`127.0.0.1:PORT` of the gRPC server."""
        return f"{self.host}:{self.bound_port('grpc')}"

    def command(self, ports: Mapping[str, int]) -> list[str]:
        """The engine's `run` line: the image's entrypoint and user, the ports as CLIP_*."""
        run = [*engine_run(), "--rm", "--name", self.container_name]
        run += ["--network", "host", "--read-only"]
        settings = {
            "CLIP_HOST": self.host,
            "CLIP_PORT": str(ports["grpc"]),
            "CLIP_METRICS_PORT": str(ports["metrics"]),
            "CLIP_HTTP_PORT": str(ports["http"]),
            "CLIP_SHUTDOWN_GRACE_S": "5",
            **self.settings,
        }
        for name, value in settings.items():
            run += ["--env", f"{name}={value}"]
        if self.repository is not None:
            run += ["--volume", f"{self.repository}:/opt/clip/model_repository:ro"]
        return [*run, self.image]

    def is_ready(self, timeout_s: float = 1.0) -> bool:
        """SERVING on grpc.health.v1."""
        return self._ports is not None and serving(self.target, timeout_s)

    def cleanup_callback(self) -> Callable[[], None]:
        """Removes the container should the engine's client die before it."""
        command = [*self._engine, "rm", "--force", "--ignore", self.container_name]
        if self._engine[0] == "docker":
            command.remove("--ignore")

        def remove() -> None:
            subprocess.run(command, capture_output=True, check=False, timeout=60)

        return remove
