"""Starts the pip `tritonserver` (from the `nvidia-pytriton` wheel) on a model repository.

    with TritonProcess(repository) as triton:       # waits until /v2/health/ready
        client = InferenceServerClient(triton.grpc_url)
        triton.kill()                               # SIGKILL the group: a crash
        triton.restart()                            # same ports, waits for ready

The wheel ships the server binary, the python backend and one stub per Python
version, but not laid out as Triton expects: `--backend-directory` must hold a
`python/` folder with `libtriton_python.so`, `triton_python_backend_utils.py` and
the stub of the running Python, so a private folder of symlinks is built. The stub
ignores PYTHONPATH and finds its interpreter (and so torch) through `PATH`: the
current virtual environment's `bin/` goes first.

The server runs in its own session (a `ChildServer`); its python stubs share the
process group, so stopping ends the whole group. `clipsvc triton` runs it in the foreground
(`run_triton`, flags from `service.settings.TritonServerSettings`).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.processes.child_server import ChildServer

if TYPE_CHECKING:
    from service.settings import TritonServerSettings

_LOGGER = logging.getLogger(__name__)

# The python-backend model file, also installed as the python-based onnxruntime backend.
_PYTHON_MODEL = Path(__file__).resolve().parent.parent / "model" / "triton_python_model.py"
_STUB_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


class TritonError(RuntimeError):
    """tritonserver could not be found, did not start, or did not become ready."""


@dataclass(frozen=True)
class TritonInstallation:
    """Where the `nvidia-pytriton` wheel keeps the server and its python backend."""

    root: Path
    server: Path
    python_backend: Path
    stub: Path
    external_libs: Path

    @classmethod
    def find(cls) -> TritonInstallation:
        """Locate the files inside the installed `pytriton` package (not importing it)."""
        import importlib.util

        # Importing pytriton itself pulls in heavy optional dependencies; only its
        # location is needed.
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonError(
                "the `nvidia-pytriton` package is not installed "
                "(pip install --no-deps nvidia-pytriton==0.5.5; `make install` does)"
            )
        root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
        found = cls(
            root=root,
            server=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / _STUB_PYTHON / "triton_python_backend_stub",
            external_libs=root / "external_libs",
        )
        for path in (
            found.server,
            found.python_backend / "libtriton_python.so",
            found.python_backend / "triton_python_backend_utils.py",
            found.stub,
        ):
            if not path.exists():
                raise TritonError(f"{path} is missing from the pytriton installation")
        return found

    def make_backend_directory(self, into: Path) -> Path:
        """Lay out `into/python/` as `--backend-directory` wants it; returns `into`.

        Also `into/onnxruntime/model.py`: the wheel has no onnxruntime backend, so the
        onnx flavor's `platform: "onnxruntime_onnx"` finds this python-based backend
        (Triton runs a `<backends>/<name>/model.py` with the python backend's library)
        and the same `model.py` as the python flavor runs `model.onnx` with ONNX Runtime.
        """
        onnx_dir = into / "onnxruntime"
        onnx_dir.mkdir(parents=True, exist_ok=True)
        onnx_model = onnx_dir / "model.py"
        if onnx_model.is_symlink() or onnx_model.exists():
            onnx_model.unlink()
        onnx_model.symlink_to(_PYTHON_MODEL)
        python_dir = into / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        links = {
            "libtriton_python.so": self.python_backend / "libtriton_python.so",
            "triton_python_backend_utils.py": self.python_backend
            / "triton_python_backend_utils.py",
            "triton_python_backend_stub": self.stub,
        }
        for name, target in links.items():
            link = python_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            if name == "libtriton_python.so":
                # Copied: Triton (2.43) refuses a python-based backend's library whose
                # real path escapes the backend directory, as a symlink's does.
                shutil.copyfile(target, link)
            else:
                link.symlink_to(target)
        return into


@dataclass(frozen=True)
class TritonPorts:
    """The three ports one server listens on."""

    grpc: int
    http: int
    metrics: int


class TritonProcess(ChildServer):
    """One `tritonserver` process (and its python stubs) in its own process group."""

    name = "tritonserver"
    error = TritonError
    port_names = ("grpc", "http", "metrics")
    not_ready_hint = " (a model that fails to load keeps it unready)"

    def __init__(
        self,
        repository: Path,
        *,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        workdir: Path | None = None,
        log_path: Path | None = None,
        inherit_output: bool = False,
        startup_timeout_s: float = 120.0,
        stop_grace_s: float = 10.0,
        extra_args: Sequence[str] = (),
        installation: TritonInstallation | None = None,
    ) -> None:
        """Prepare (not start); a port of 0 is replaced by a free one at the first start.

        `workdir` holds the backend directory and the default log file; when not
        given a temporary one is made and removed by `close()`. With
        `inherit_output` the server writes to this process's stdout/stderr (the
        foreground CLI) instead of `log_path`.
        """
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise TritonError(f"model repository {self.repository} is not a directory")
        self.installation = installation or TritonInstallation.find()
        super().__init__(
            host=host,
            ports={"grpc": grpc_port, "http": http_port, "metrics": metrics_port},
            workdir=workdir,
            log_path=log_path,
            inherit_output=inherit_output,
            startup_timeout_s=startup_timeout_s,
            stop_grace_s=stop_grace_s,
        )
        self.extra_args = tuple(extra_args)
        self._shm_prefix = ""

    # ------------------------------------------------------------------ addresses
    @property
    def ports(self) -> TritonPorts:
        """The bound ports (known after the first start)."""
        return TritonPorts(
            self.bound_port("grpc"), self.bound_port("http"), self.bound_port("metrics")
        )

    @property
    def grpc_url(self) -> str:
        """`host:port` of the gRPC endpoint, as tritonclient.grpc wants it."""
        return f"{self.host}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        """`http://host:port` of the HTTP/REST endpoint."""
        return f"http://{self.host}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        """`http://host:port/metrics`: Triton's own Prometheus metrics."""
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    # ------------------------------------------------------------------ ChildServer
    def is_ready(self, timeout_s: float = 1.0) -> bool:
        """One `GET /v2/health/ready`: server up and (strict readiness) every model ready."""
        if self._ports is None:
            return False
        return _http_ok(f"{self.http_url}/v2/health/ready", timeout_s)

    def startup_failure(self) -> str | None:
        """Models that failed to load, once the server is live (waiting would not help)."""
        # Triton opens its endpoints after loading the repository: live but not ready
        # means a model failed (it stays up: --exit-on-error=false).
        if not _http_ok(f"{self.http_url}/v2/health/live", 1.0):
            return None
        failed = _failed_models(self.http_url)
        if not failed:
            return None
        reasons = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
        return f"models failed to load: {reasons}"

    def prepare(self) -> None:
        """The backend directory, and a shared-memory prefix of this launch's own."""
        self.installation.make_backend_directory(self.workdir / "backends")
        self._shm_prefix = f"clipsvc_triton_{os.getpid()}_{uuid.uuid4().hex[:12]}_"

    def cleanup_callback(self) -> Callable[[], None]:
        """Removes the launch's /dev/shm regions, which a killed server cannot unlink."""
        return functools.partial(_remove_shm_regions, self._shm_prefix)

    def command(self, ports: Mapping[str, int]) -> list[str]:
        """The tritonserver command line for these ports (after `prepare()`)."""
        backend_dir = self.workdir / "backends"
        return [
            str(self.installation.server),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            # Our configs are complete; auto-complete would only hide mistakes.
            "--disable-auto-complete-config",
            "--strict-model-config=true",
            # No GPU here: GPU metrics and pinned (CUDA host) memory only log errors.
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            # Ready only when every model is: that is what a gateway's health wants.
            "--strict-readiness=true",
            # A model that fails to load must not take the others down with it.
            "--exit-on-error=false",
            # In-flight requests get this long after SIGTERM; our own grace follows.
            f"--exit-timeout-secs={max(1, int(self.stop_grace_s) - 2)}",
            f"--grpc-address={self.host}",
            f"--grpc-port={ports['grpc']}",
            f"--http-address={self.host}",
            f"--http-port={ports['http']}",
            f"--metrics-address={self.host}",
            f"--metrics-port={ports['metrics']}",
            # The python backend names its /dev/shm regions `<prefix><counter>`; with
            # the default prefix two servers on one machine corrupt each other's
            # regions (boost::interprocess::lock_exception in the stub).
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        """The server's environment: this venv's `bin/` first on PATH for the python stub."""
        env = dict(os.environ)
        # sys.executable is the venv's own `bin/python` (not resolved through its
        # symlink), so this is the venv's bin/ and the stub imports its torch.
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
        env["VIRTUAL_ENV"] = sys.prefix
        # The python stub runs torch: sleeping (not spinning) OpenMP workers, as the gateway.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if self.installation.external_libs.is_dir():
            libs = str(self.installation.external_libs)
            old = env.get("LD_LIBRARY_PATH")
            env["LD_LIBRARY_PATH"] = f"{old}{os.pathsep}{libs}" if old else libs
        return env


def _remove_shm_regions(prefix: str) -> None:
    # A killed server cannot unlink its shared-memory regions; they would pile up in
    # /dev/shm (RAM) across fault tests.
    if prefix:
        for region in Path("/dev/shm").glob(f"{prefix}*"):
            region.unlink(missing_ok=True)


def _http_ok(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _failed_models(http_base: str) -> dict[str, str]:
    """Models the repository index reports UNAVAILABLE with a reason (a failed load)."""
    import json

    request = urllib.request.Request(f"{http_base}/v2/repository/index", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=2.0) as response:
            index = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    return {
        str(entry.get("name")): str(entry.get("reason"))
        for entry in index
        if entry.get("state") == "UNAVAILABLE" and entry.get("reason")
    }


def server_version(http_url: str, timeout_s: float = 2.0) -> str:
    """The server's version string from `GET /v2` ("" when it does not answer)."""
    import json

    try:
        with urllib.request.urlopen(f"{http_url}/v2", timeout=timeout_s) as response:
            return str(json.loads(response.read()).get("version", ""))
    except (urllib.error.URLError, OSError, ValueError):
        return ""


def opentelemetry_args(url: str, rate: int = 1, service_name: str = "triton") -> list[str]:
    """tritonserver flags that export its inference traces to `url` over OTLP/HTTP (none
    when `url` is ''). Triton continues the caller's `traceparent` (context propagation,
    24.01 / 2.42 and later): its spans go under the gateway's `backend` span."""
    if not url:
        return []
    settings = [
        "mode=opentelemetry",
        f"rate={max(1, rate)}",
        "level=TIMESTAMPS",
        f"opentelemetry,url={url}",
        f"opentelemetry,resource=service.name={service_name}",
    ]
    return [arg for setting in settings for arg in ("--trace-config", setting)]


# ---------------------------------------------------------------------- CLI
def run_triton(args: TritonServerSettings) -> int:
    """Run tritonserver in the foreground until Ctrl-C / SIGTERM; the exit status."""
    stop_requested = threading.Event()

    def _request_stop(signum: int, _frame: object) -> None:
        _LOGGER.info("got %s: stopping tritonserver", signal.Signals(signum).name)
        stop_requested.set()

    # The server has its own session, so terminal signals reach only us: forward them.
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _request_stop) for sig in forwarded}
    triton: TritonProcess | None = None
    try:
        triton = TritonProcess(
            args.repository,
            host=args.host,
            grpc_port=args.port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            log_path=args.log_file,
            inherit_output=args.log_file is None,
            startup_timeout_s=args.startup_timeout,
            stop_grace_s=args.stop_grace,
            extra_args=opentelemetry_args(args.otlp_url, args.trace_rate),
        )
        try:
            triton.start()
        except TritonError as exc:
            print(f"tritonserver did not start: {exc}", file=sys.stderr)
            return 1
        version = server_version(triton.http_url)
        print(
            f"tritonserver {version} ready (pid {triton.pid}): grpc {triton.grpc_url}  "
            f"http {triton.http_url}  metrics {triton.metrics_url}  "
            f"repository {triton.repository}",
            flush=True,
        )
        while not stop_requested.wait(0.5):
            if not triton.running:
                code = triton.stop()
                print(f"tritonserver exited on its own with {code}", file=sys.stderr)
                return 1
        code = triton.stop()
        print(f"tritonserver stopped ({code})", flush=True)
        return 0
    except TritonError as exc:
        print(f"tritonserver: {exc}", file=sys.stderr)
        return 1
    finally:
        if triton is not None:
            triton.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m service.processes.triton_server ...`: the same as `clipsvc triton ...`.

    Parses the same `TritonServerSettings` itself instead of calling `service.cli`, which
    imports this module: the CLI sits above the processes, never below them.
    """
    import argparse

    from service.settings import SettingsError, TritonServerSettings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `clipsvc` does (bench/README)
    parser = argparse.ArgumentParser(
        prog="clipsvc triton", description="Run the pip tritonserver on a model repository."
    )
    TritonServerSettings.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = TritonServerSettings.from_sources(args)
    except SettingsError as exc:
        parser.error(str(exc))  # a bad flag or CLIP_* value: a usage error, exit 2
    return run_triton(settings)


if __name__ == "__main__":
    sys.exit(main())
