"""Helpers for the Helm chart tests: find (or install) a real `helm`, render, index output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tests.support.paths import REPO_ROOT

CHART_DIR = REPO_ROOT / "helm" / "clip-service"
LOCAL_HELM = REPO_ROOT / ".tools" / "helm" / "helm"
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_helm.sh"
RELEASE = "rel"
NAMESPACE = "clip"
HEADLESS_LABEL = "clip-service/headless"


def _works(helm: str | Path) -> bool:
    try:
        done = subprocess.run(
            [str(helm), "version", "--short"], capture_output=True, timeout=30, check=False
        )
    except OSError:
        return False
    return done.returncode == 0


def find_helm() -> str | None:
    """`$CLIP_HELM`, else `<repo>/.tools/helm/helm`, else `helm` on PATH; None if none runs."""
    override = os.environ.get("CLIP_HELM")
    if override:
        # An explicit choice that does not work is an error, not a reason to look elsewhere.
        if not _works(override):
            raise RuntimeError(f"CLIP_HELM={override} does not run `helm version`")
        return override
    if LOCAL_HELM.exists() and _works(LOCAL_HELM):
        return str(LOCAL_HELM)
    on_path = shutil.which("helm")
    if on_path and _works(on_path):
        return on_path
    return None


def ensure_helm() -> str:
    """A working helm binary, installing one with scripts/install_helm.sh when none exists."""
    helm = find_helm()
    if helm is not None:
        return helm
    done = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=300, check=False
    )
    helm = find_helm()
    if helm is None:
        raise RuntimeError(
            f"no helm binary and {INSTALL_SCRIPT.name} failed (exit {done.returncode}):\n"
            f"{done.stdout}\n{done.stderr}"
        )
    return helm


def run_helm(
    helm: str, *args: str, values: Mapping[str, Any] | None = None, chart: Path = CHART_DIR
) -> subprocess.CompletedProcess[str]:
    """Run `helm <args> <chart> [-f values.yaml]` and return the finished process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [helm, *args, str(chart)]
        if values:
            values_file = Path(tmp) / "values.yaml"
            values_file.write_text(yaml.safe_dump(dict(values)))
            cmd += ["-f", str(values_file)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def template(
    helm: str, values: Mapping[str, Any] | None = None, *extra: str, chart: Path = CHART_DIR
) -> subprocess.CompletedProcess[str]:
    """`helm template rel <chart> -n clip`; the caller checks the exit status."""
    return run_helm(
        helm, "template", RELEASE, "--namespace", NAMESPACE, *extra, values=values, chart=chart
    )


@dataclass
class Rendered:
    """The manifests one `helm template` produced, with lookups by kind and component."""

    docs: list[dict[str, Any]]

    @classmethod
    def from_yaml(cls, text: str) -> Rendered:
        """Parse a multi-document YAML stream, dropping empty documents."""
        return cls([doc for doc in yaml.safe_load_all(text) if doc])

    def all(self, kind: str) -> list[dict[str, Any]]:
        """Every manifest of one kind."""
        return [doc for doc in self.docs if doc["kind"] == kind]

    def maybe(self, kind: str, component: str, *, headless: bool = False) -> dict[str, Any] | None:
        """The manifest of `kind` labelled with `component`, or None; two are a bug.

        Headless companion Services share their component label, so they are picked
        only when asked for."""
        found = [
            doc
            for doc in self.all(kind)
            if doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
            and (HEADLESS_LABEL in doc["metadata"]["labels"]) == headless
        ]
        assert len(found) <= 1, f"{len(found)} {kind}s for component {component}"
        return found[0] if found else None

    def one(self, kind: str, component: str, *, headless: bool = False) -> dict[str, Any]:
        """The manifest of `kind` for `component`; fails when absent."""
        doc = self.maybe(kind, component, headless=headless)
        assert doc is not None, f"no {kind} for component {component}"
        return doc

    def named(self, kind: str, name: str) -> dict[str, Any]:
        """The manifest of `kind` called `name`."""
        found = [doc for doc in self.all(kind) if doc["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind}s named {name}"
        return found[0]


def pod_spec(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """The pod spec of a Deployment."""
    return deployment["spec"]["template"]["spec"]


def container(deployment: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One container (not init container) of a Deployment, by name."""
    found = [c for c in pod_spec(deployment)["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name}"
    return found[0]


def init_container(deployment: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """One init container of a Deployment, by name, or None."""
    for c in pod_spec(deployment).get("initContainers", []):
        if c["name"] == name:
            return c
    return None


def env_entries(c: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's `env` list keyed by variable name."""
    return {entry["name"]: entry for entry in c.get("env", [])}


def volumes(deployment: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A Deployment's volumes keyed by name."""
    return {v["name"]: v for v in pod_spec(deployment).get("volumes", [])}


def mounts(c: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's volume mounts keyed by volume name."""
    return {m["name"]: m for m in c.get("volumeMounts", [])}


def port_numbers(c: Mapping[str, Any]) -> dict[str, int]:
    """A container's named ports: name → containerPort."""
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def leaf_paths(values: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted paths of a nested mapping, yielding every mapping node and leaf."""
    if isinstance(values, Mapping):
        for key, child in values.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path, child
            yield from leaf_paths(child, path)


class _FakeApiHandler(BaseHTTPRequestHandler):
    """Answers what `helm template --dry-run=server` asks: discovery, then GETs by name."""

    server: _FakeApiServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.server.requests.append(path)
        found = self.server.objects.get(path)
        if found is None:
            self._answer(
                404,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "NotFound",
                    "code": 404,
                },
            )
        else:
            self._answer(200, found)

    def _answer(self, code: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads `requests` instead."""


class _FakeApiServer(ThreadingHTTPServer):
    objects: dict[str, Mapping[str, Any]]
    requests: list[str]


@contextlib.contextmanager
def fake_kube_api(*secrets: Mapping[str, Any]) -> Iterator[tuple[Path, list[str]]]:
    """A loopback Kubernetes API holding `secrets` (v1 Secret manifests), for `lookup`.

    Yields a kubeconfig path for `helm template --dry-run=server --kubeconfig ...` and the
    list of paths helm asked for. Only GET by name is served; anything else is NotFound.
    """
    objects: dict[str, Mapping[str, Any]] = {
        "/version": {"major": "1", "minor": "31", "gitVersion": "v1.31.0"},
        "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
        "/api/v1": {
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                {
                    "name": "secrets",
                    "singularName": "secret",
                    "namespaced": True,
                    "kind": "Secret",
                    "verbs": ["get", "list"],
                }
            ],
        },
    }
    for secret in secrets:
        meta = secret["metadata"]
        objects[f"/api/v1/namespaces/{meta['namespace']}/secrets/{meta['name']}"] = secret
    server = _FakeApiServer(("127.0.0.1", 0), _FakeApiHandler)
    server.objects = objects
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, name="fake-kube-api", daemon=True)
    thread.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = Path(tmp) / "kubeconfig"
            host, port = server.server_address[:2]
            kubeconfig.write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "v1",
                        "kind": "Config",
                        "clusters": [
                            {"name": "fake", "cluster": {"server": f"http://{host}:{port}"}}
                        ],
                        "users": [{"name": "fake", "user": {"token": "fake"}}],
                        "contexts": [
                            {
                                "name": "fake",
                                "context": {
                                    "cluster": "fake",
                                    "user": "fake",
                                    "namespace": NAMESPACE,
                                },
                            }
                        ],
                        "current-context": "fake",
                    }
                )
            )
            kubeconfig.chmod(0o600)
            yield kubeconfig, server.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
