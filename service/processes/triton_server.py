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

The server runs in its own session; its python stubs share the process group, so
stopping ends the whole group. `clipsvc triton` runs it in the foreground
(`add_triton_arguments` / `run_triton`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from service.processes.child_server import end_group, free_port

_LOGGER = logging.getLogger(__name__)

# The python-backend model file, also installed as the python-based onnxruntime backend.
_PYTHON_MODEL = Path(__file__).resolve().parent.parent / "model" / "triton_python_model.py"
_STUB_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
_PORT_ATTEMPTS = 4
_POLL_INTERVAL_S = 0.1
_LOG_TAIL_CHARS = 3000


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
                "(pip install 'clip-service[triton]')"
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
            link.symlink_to(target)
        return into


@dataclass(frozen=True)
class TritonPorts:
    """The three ports one server listens on."""

    grpc: int
    http: int
    metrics: int


class TritonProcess:
    """One `tritonserver` process (and its python stubs) in its own process group."""

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
        self.host = host
        self._requested = TritonPorts(grpc_port, http_port, metrics_port)
        self._ports: TritonPorts | None = None
        self._own_workdir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="tritonserver-"))
        )
        self.log_path = (
            Path(log_path) if log_path is not None else self.workdir / "tritonserver.log"
        )
        self.inherit_output = inherit_output
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.extra_args = tuple(extra_args)
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._shm_prefix = ""
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ addresses
    @property
    def ports(self) -> TritonPorts:
        """The bound ports (known after the first start)."""
        if self._ports is None:
            raise TritonError("not started yet")
        return self._ports

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

    @property
    def pid(self) -> int | None:
        """Process id of the server, which is also its process group id; None when stopped."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the server process is alive (not necessarily ready)."""
        return self._process is not None and self._process.poll() is None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> TritonProcess:
        """Start and block until ready; on failure nothing is left running."""
        with self._lock:
            if self.running:
                raise TritonError(f"already running (pid {self.pid})")
            if self._ports is not None:
                self._launch(self._ports)
                return self
            last_error: TritonError | None = None
            # A port found free can be taken before Triton binds it; only ports we
            # picked ourselves can be changed on a retry.
            attempts = (
                _PORT_ATTEMPTS
                if 0 in (self._requested.grpc, self._requested.http, self._requested.metrics)
                else 1
            )
            for _ in range(attempts):
                ports = TritonPorts(
                    self._requested.grpc or free_port(self.host),
                    self._requested.http or free_port(self.host),
                    self._requested.metrics or free_port(self.host),
                )
                try:
                    self._launch(ports)
                except TritonError as exc:
                    last_error = exc
                    if "exited" not in str(exc):
                        raise
                    _LOGGER.warning("tritonserver did not start, trying other ports: %s", exc)
                    continue
                self._ports = ports
                return self
            assert last_error is not None
            raise last_error

    def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM the process group, SIGKILL what is left after `grace_s`; the exit code."""
        with self._lock:
            return self._end(signal.SIGTERM, self.stop_grace_s if grace_s is None else grace_s)

    def kill(self) -> int | None:
        """SIGKILL the whole group at once, like a crash (for fault tests)."""
        with self._lock:
            return self._end(signal.SIGKILL, 0.0)

    def restart(self, *, kill: bool = False) -> TritonProcess:
        """Stop (or kill) and start again on the same ports; blocks until ready."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove the working directory if it was made here."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def is_ready(self, timeout_s: float = 1.0) -> bool:
        """One `GET /v2/health/ready`: server up and (strict readiness) every model ready."""
        if self._ports is None:
            return False
        return _http_ok(f"{self.http_url}/v2/health/ready", timeout_s)

    def log_tail(self, n_chars: int = _LOG_TAIL_CHARS) -> str:
        """The end of the server's log (empty with `inherit_output`)."""
        if self.inherit_output:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:].strip()
        except OSError:
            return ""

    def command(self, ports: TritonPorts, shm_prefix: str) -> list[str]:
        """The tritonserver command line for these ports and shared-memory prefix."""
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
            f"--grpc-port={ports.grpc}",
            f"--http-address={self.host}",
            f"--http-port={ports.http}",
            f"--metrics-address={self.host}",
            f"--metrics-port={ports.metrics}",
            # The python backend names its /dev/shm regions `<prefix><counter>`; with
            # the default prefix two servers on one machine corrupt each other's
            # regions (boost::interprocess::lock_exception in the stub).
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
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

    def __enter__(self) -> TritonProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _launch(self, ports: TritonPorts) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.installation.make_backend_directory(self.workdir / "backends")
        shm_prefix = f"clipsvc_triton_{os.getpid()}_{uuid.uuid4().hex[:12]}_"
        command = self.command(ports, shm_prefix)
        _LOGGER.info(
            "starting tritonserver on %s (grpc %d, http %d, metrics %d), repository %s",
            self.host, ports.grpc, ports.http, ports.metrics, self.repository,
        )  # fmt: skip
        _LOGGER.debug("tritonserver command: %s", " ".join(command))
        log_file: IO[bytes] | None = None
        if not self.inherit_output:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = self.log_path.open("ab")
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT if log_file is not None else None,
                env=self.environment(),
                cwd=self.workdir,
                # Own session: Ctrl-C in a terminal reaches only us, and the group
                # (server + python stubs) can be ended as one.
                start_new_session=True,
            )
        finally:
            if log_file is not None:
                log_file.close()
        # Registered at once so that an interrupted start or a forgotten object
        # leaves nothing running.
        finalizer = weakref.finalize(self, _end_server, process, signal.SIGKILL, 0.0, shm_prefix)
        started = time.monotonic()
        try:
            self._wait_ready(process, ports)
        except BaseException:
            finalizer()
            raise
        self._process = process
        self._shm_prefix = shm_prefix
        self._finalizer = finalizer
        _LOGGER.info(
            "tritonserver ready in %.1f s (pid %d, grpc %s:%d)",
            time.monotonic() - started, process.pid, self.host, ports.grpc,
        )  # fmt: skip

    def _wait_ready(self, process: subprocess.Popen[bytes], ports: TritonPorts) -> None:
        base = f"http://{self.host}:{ports.http}"
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = process.poll()
            if code is not None:
                raise TritonError(
                    f"tritonserver exited with {code} before it was ready "
                    f"(grpc port {ports.grpc}); log tail:\n{self.log_tail()}"
                )
            if _http_ok(f"{base}/v2/health/ready", 1.0):
                return
            # Triton opens its endpoints after loading the repository: live but not
            # ready means a model failed (it stays up: --exit-on-error=false). Waiting
            # longer would not help, so fail now with the reasons.
            if _http_ok(f"{base}/v2/health/live", 1.0):
                failed = _failed_models(base)
                if failed:
                    reasons = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
                    raise TritonError(
                        f"tritonserver started but models failed to load: {reasons}\n"
                        f"log tail:\n{self.log_tail()}"
                    )
            if time.monotonic() > deadline:
                raise TritonError(
                    f"tritonserver was not ready within {self.startup_timeout_s:.0f} s "
                    f"(a model that fails to load keeps it unready); log tail:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)  # poll interval, not a wait for readiness

    def _end(self, sig: signal.Signals, grace_s: float) -> int | None:
        process, self._process = self._process, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is None:
            return None
        return _end_server(process, sig, grace_s, self._shm_prefix)


def _end_server(
    process: subprocess.Popen[bytes], sig: signal.Signals, grace_s: float, shm_prefix: str
) -> int:
    code, killed = end_group(process, sig, grace_s if sig != signal.SIGKILL else 10.0)
    if killed and sig != signal.SIGKILL:
        _LOGGER.warning(
            "tritonserver (pid %d) or a stub outlived SIGTERM (%.0f s): SIGKILLed",
            process.pid,
            grace_s,
        )
    # A killed server cannot unlink its shared-memory regions; they would pile up in
    # /dev/shm (RAM) across fault tests.
    if shm_prefix:
        for region in Path("/dev/shm").glob(f"{shm_prefix}*"):
            region.unlink(missing_ok=True)
    _LOGGER.info("tritonserver (pid %d) ended with %s", process.pid, code)
    return code


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


# ---------------------------------------------------------------------- CLI
def add_triton_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `clipsvc triton`."""
    from service.settings import DEFAULT_MODEL_REPOSITORY

    parser.add_argument(
        "--repository",
        type=Path,
        default=Path(os.environ.get("CLIP_MODEL_REPOSITORY", DEFAULT_MODEL_REPOSITORY)),
        help="Exported model repository, python flavor (`clipsvc export --flavor python`) "
        "[env CLIP_MODEL_REPOSITORY] (default: %(default)s)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address all three endpoints bind to (default: %(default)s).",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8001,
        help="gRPC port; 0 picks a free one (default: %(default)s).",
    )
    parser.add_argument(
        "--http-port", type=int, default=8000, help="HTTP/REST port (default: %(default)s)."
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=8002,
        help="Triton's /metrics port (default: %(default)s).",
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        default=None,
        help="Write the server's log here instead of to this terminal.",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=120.0,
        help="Seconds to wait for the server and every model to be ready (default: %(default)s).",
    )
    parser.add_argument(
        "--stop-grace",
        type=float,
        default=10.0,
        help="Seconds the server gets to exit after SIGTERM before SIGKILL (default: %(default)s).",
    )


def run_triton(args: argparse.Namespace) -> int:
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
    """`python -m service.processes.triton_server ...`: the same as `clipsvc triton ...`."""
    parser = argparse.ArgumentParser(prog="clipsvc triton", description=run_triton.__doc__)
    add_triton_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_triton(args)


if __name__ == "__main__":
    sys.exit(main())
