"""The Helm chart, rendered by a real `helm` and checked against the Kubernetes schemas.

Each value set is rendered once per session (`rendered`); the checks then read the parsed
manifests. Custom resources (ServiceMonitor) have no schema in kubernetes-validate and
are checked field by field.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from tests.support.helm import (
    CHART_DIR,
    NAMESPACE,
    RELEASE,
    Rendered,
    container,
    ensure_helm,
    env_entries,
    fake_kube_api,
    init_container,
    leaf_paths,
    mounts,
    pod_spec,
    port_numbers,
    run_helm,
    template,
    volumes,
)

pytestmark = pytest.mark.integration

K8S_VERSION = latest_version()

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "debug-log": {"gateway": {"logLevel": "DEBUG"}},
    "external-redis": {
        "redis": {"mode": "external", "external": {"url": "redis://:s3cret@cache.example:6379/2"}},
    },
    "external-redis-secret": {
        "redis": {
            "mode": "external",
            "external": {"existingSecret": "shared-redis", "existingSecretKey": "url"},
        },
    },
    "api-keys": {
        "gateway": {"apiKeys": {"enabled": True, "keys": ["key-one", "key-two"]}},
    },
    "redis-auth-existing": {
        "redis": {"builtin": {"auth": {"existingSecret": "cache-pw", "existingSecretKey": "pw"}}},
    },
    "redis-open": {
        "redis": {"builtin": {"auth": {"enabled": False}, "networkPolicy": {"enabled": False}}},
    },
    "pvc-models": {
        "triton": {
            "modelRepository": {
                "source": "pvc",
                "pvc": {"existingClaim": "clip-models", "subPath": "vit-b-32"},
            },
        },
        # The gateway reads metadata.json from the same claim Triton serves.
        "gateway": {"modelRepository": {"existingClaim": "clip-models", "subPath": "vit-b-32"}},
    },
    "init-container-models": {
        "triton": {"modelRepository": {"source": "initContainer"}},
    },
    "monitoring": {
        "monitoring": {
            "podAnnotations": True,
            "serviceMonitor": {
                "enabled": True,
                "namespace": "monitoring",
                "labels": {"release": "kube-prometheus-stack"},
            },
        },
    },
    "hpa-netpol": {
        "gateway": {
            "autoscaling": {
                "enabled": True,
                "minReplicas": 3,
                "maxReplicas": 12,
                "targetMemoryUtilizationPercentage": 80,
            },
            "probes": {"liveness": {"type": "tcp"}},
        },
        "networkPolicy": {
            "enabled": True,
            "grpcFrom": [{"namespaceSelector": {"matchLabels": {"team": "search"}}}],
            "httpFrom": [{"namespaceSelector": {"matchLabels": {"team": "rag"}}}],
        },
    },
    "cpu-triton": {"triton": {"gpu": {"enabled": False}, "tolerations": []}},
    "cpu-triton-init": {
        "triton": {"gpu": {"enabled": False}, "modelRepository": {"source": "initContainer"}},
    },
    "tls": {"gateway": {"tls": {"enabled": True, "existingSecret": "clip-tls"}}},
    "tls-api-keys": {
        "gateway": {
            "tls": {
                "enabled": True,
                "existingSecret": "clip-tls",
                "clientCA": {"enabled": True, "existingSecret": "clip-client-ca"},
            },
            "apiKeys": {
                "enabled": True,
                "existingSecret": "clip-api-keys",
                "existingSecretKey": "keys.txt",
            },
        },
    },
    "embedded-only": {
        "gateway": {"backend": "embedded"},
        "triton": {"enabled": False},
        "redis": {"mode": "disabled"},
    },
    "long-names": {"fullnameOverride": "x" * 63},
    "sized": {
        "gateway": {
            # Every limit, each to a value of its own and none its default: a template line
            # that reads the wrong limit, or none, renders a value the test can tell apart.
            "limits": {
                "maxBatchSize": 24,
                "maxInflightBatches": 3,
                "maxItems": 200,
                "maxImageBytes": 10_485_760,
                "maxImagePixels": 40_000_000,
                "maxMessageBytes": 33_554_432,
                "maxConcurrentRpcs": 300,
                "maxInflightRequestBytes": 268_435_456,
                "maxPrompts": 2000,
                "decodeBudgetPixels": 120_000_000,
                "localCacheBytes": 536_870_912,
                "labelCacheItems": 100,
                "httpHeaderTimeoutSeconds": 7,
                "httpBodyTimeoutSeconds": 45,
                "maxHttpBodyReads": 16,
            },
            "resources": {
                "requests": {"cpu": "2", "memory": "2Gi"},
                "limits": {"cpu": "3500m", "memory": "4Gi"},
            },
            "containerPorts": {"health": 8086},
            "probes": {"grpcService": "clip.v1.ClipService"},
        },
    },
    "decode-threads": {"gateway": {"decodeThreads": 6}},
    "triton-scaled": {
        "triton": {"replicaCount": 2, "gpu": {"count": 2, "instancesPerGpu": 3}},
    },
    "autoscaled": {
        "gateway": {"autoscaling": {"enabled": True, "targetQueuedItems": 64}},
        "triton": {
            "autoscaling": {
                "enabled": True,
                "minReplicas": 2,
                "maxReplicas": 6,
                "targetQueueMicroseconds": 50000,
            },
        },
        "monitoring": {
            "serviceMonitor": {"enabled": True},
            "prometheusAdapter": {"rules": True, "window": "3m"},
        },
    },
    "http-ports": {"gateway": {"service": {"httpPort": 80}, "containerPorts": {"http": 8081}}},
    # null removes a default: no CPU request or limit at all.
    "no-cpu": {"gateway": {"resources": {"requests": {"cpu": None}}}},
}


@pytest.fixture(scope="session")
def helm() -> str:
    """A real helm binary (installed into .tools/ on first use)."""
    return ensure_helm()


@pytest.fixture(scope="session")
def rendered(helm: str) -> dict[str, Rendered]:
    """Every value set rendered once."""
    out: dict[str, Rendered] = {}
    for name, values in VALUE_SETS.items():
        done = template(helm, values)
        assert done.returncode == 0, f"helm template failed for {name}:\n{done.stderr}"
        out[name] = Rendered.from_yaml(done.stdout)
    return out


def _gateway(r: Rendered) -> dict[str, Any]:
    return r.one("Deployment", "gateway")


def _gateway_container(r: Rendered) -> dict[str, Any]:
    return container(_gateway(r), "gateway")


def _gateway_config(r: Rendered) -> dict[str, str]:
    return r.one("ConfigMap", "gateway")["data"]


def _triton(r: Rendered) -> dict[str, Any]:
    return r.one("Deployment", "triton")


# ------------------------------------------------------------------ lint and validity


@pytest.mark.parametrize(
    "name",
    [
        "defaults",
        "api-keys",
        "redis-open",
        "cpu-triton",
        "tls-api-keys",
        "hpa-netpol",
        "embedded-only",
        "sized",
        "triton-scaled",
        "autoscaled",
    ],
)
def test_helm_lint_strict(helm: str, name: str) -> None:
    done = run_helm(helm, "lint", "--strict", "--namespace", NAMESPACE, values=VALUE_SETS[name])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_manifests_validate_against_kubernetes_schemas(
    rendered: dict[str, Rendered], name: str
) -> None:
    for doc in rendered[name].docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRD: no schema shipped; see test_service_monitors
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(
                f"{name}: {doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}"
            )


def test_validator_rejects_a_broken_manifest(rendered: dict[str, Rendered]) -> None:
    # Guards the test above against silently validating nothing.
    broken = json.loads(json.dumps(_gateway(rendered["defaults"])))
    pod_spec(broken)["containers"][0]["startupProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_names_labels_and_selectors_are_consistent(
    rendered: dict[str, Rendered], name: str
) -> None:
    r = rendered[name]
    for doc in r.docs:
        meta = doc["metadata"]
        assert len(meta["name"]) <= 63, meta["name"]
        assert meta.get("namespace") == (
            "monitoring" if doc["kind"] == "ServiceMonitor" and name == "monitoring" else NAMESPACE
        )
        labels = meta["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
    for kind in ("Deployment", "Service", "ConfigMap", "Secret"):
        names = [d["metadata"]["name"] for d in r.all(kind)]
        assert len(names) == len(set(names)), f"duplicate {kind} names {names}"
    deployments = r.all("Deployment")
    for dep in deployments:
        selector = dep["spec"]["selector"]["matchLabels"]
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
    # Every Service selects exactly one Deployment's pods and targets ports they declare.
    for svc in r.all("Service"):
        selected = [
            d
            for d in deployments
            if svc["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, svc["metadata"]["name"]
        declared = {p["name"] for c in pod_spec(selected[0])["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in declared


# ------------------------------------------------------------------ gateway


def _health_port(r: Rendered) -> int:
    """The gateway's named `health` port, checked against the setting that opens it."""
    c = _gateway_container(r)
    port = port_numbers(c)["health"]
    assert int(_gateway_config(r)["CLIP_HEALTH_PORT"]) == port
    assert port not in (port_numbers(c)["grpc"], port_numbers(c)["metrics"])
    return port


@pytest.mark.parametrize("name", ["defaults", "tls", "api-keys", "tls-api-keys"])
def test_probes_ask_the_plaintext_health_port(rendered: dict[str, Rendered], name: str) -> None:
    # Kubelet gRPC probes speak plaintext and send no API key: only the health port answers
    # them truthfully whatever the gRPC port requires, so every probe goes there.
    r = rendered[name]
    c = _gateway_container(r)
    health = _health_port(r)
    # Startup and liveness ask the process-only name: neither a Triton outage nor a Triton
    # still loading its models (15 min allowed) restarts a gateway.
    assert c["startupProbe"]["grpc"] == {"port": health, "service": "liveness"}
    assert c["livenessProbe"]["grpc"] == {"port": health, "service": "liveness"}
    # Readiness asks the whole server: SERVING only after warm-up, while the backend answers.
    assert c["readinessProbe"]["grpc"] == {"port": health, "service": ""}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "tcpSocket" not in c[probe], probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    # Probes reach pods directly; no Service publishes the health port.
    for svc in r.all("Service"):
        assert all(p["targetPort"] != "health" for p in svc["spec"]["ports"])


def test_health_port_and_readiness_service_from_values(rendered: dict[str, Rendered]) -> None:
    c = _gateway_container(rendered["sized"])
    assert _health_port(rendered["sized"]) == 8086
    assert c["readinessProbe"]["grpc"] == {"port": 8086, "service": "clip.v1.ClipService"}
    assert c["livenessProbe"]["grpc"] == {"port": 8086, "service": "liveness"}


def test_tcp_liveness_leaves_the_other_probes_on_the_health_port(
    rendered: dict[str, Rendered],
) -> None:
    r = rendered["hpa-netpol"]
    c = _gateway_container(r)
    assert c["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert c["startupProbe"]["grpc"] == {"port": _health_port(r), "service": "liveness"}
    assert c["readinessProbe"]["grpc"] == {"port": _health_port(r), "service": ""}


def test_gateway_shutdown_fits_in_the_grace_period(rendered: dict[str, Rendered]) -> None:
    dep = _gateway(rendered["defaults"])
    c = _gateway_container(rendered["defaults"])
    grace = float(_gateway_config(rendered["defaults"])["CLIP_SHUTDOWN_GRACE_S"])
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod_spec(dep)["terminationGracePeriodSeconds"] > grace + pre_stop


def test_gateway_rollout_never_drops_capacity(rendered: dict[str, Rendered]) -> None:
    strategy = _gateway(rendered["defaults"])["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    pdb = rendered["defaults"].one("PodDisruptionBudget", "gateway")
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == _gateway(rendered["defaults"])["spec"]["selector"]["matchLabels"]
    )


@pytest.mark.parametrize("component", ["gateway", "triton", "redis"])
def test_pods_are_locked_down(rendered: dict[str, Rendered], component: str) -> None:
    dep = rendered["defaults"].one("Deployment", component)
    spec = pod_spec(dep)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    main = container(dep, component)
    assert main["resources"]["requests"]["memory"]
    assert main["resources"]["limits"]["memory"]


def test_gateway_has_a_writable_tmp(rendered: dict[str, Rendered]) -> None:
    dep = _gateway(rendered["defaults"])
    assert "emptyDir" in volumes(dep)["tmp"]
    assert mounts(container(dep, "gateway"))["tmp"]["mountPath"] == "/tmp"


def test_gateway_settings_come_from_the_configmap(rendered: dict[str, Rendered]) -> None:
    r = rendered["defaults"]
    c = _gateway_container(r)
    cm = r.one("ConfigMap", "gateway")
    assert c["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]
    data = cm["data"]
    assert all(key.startswith("CLIP_") for key in data)
    assert all(isinstance(value, str) for value in data.values())
    assert data["CLIP_BACKEND"] == "triton"
    assert data["CLIP_MAX_BATCH_SIZE"] == "32" and data["CLIP_MAX_INFLIGHT_BATCHES"] == "1"
    assert data["CLIP_METRICS_PORT"] == str(port_numbers(c)["metrics"])
    assert data["CLIP_HTTP_PORT"] == str(port_numbers(c)["http"]) == "8080"
    # Gateways dial the headless Triton Service (one address per pod, balanced per call)
    # on the port the Triton container listens on.
    headless = r.one("Service", "triton", headless=True)
    triton = container(r.one("Deployment", "triton"), "triton")
    grpc_port = port_numbers(triton)["grpc"]
    assert data["CLIP_TRITON_URL"] == f"dns:///{headless['metadata']['name']}:{grpc_port}"
    assert "CLIP_API_KEYS_FILE" not in data


#: gateway.limits.<value> → the gateway setting it becomes (CLIP_<SETTING>).
LIMIT_SETTINGS = {
    "maxBatchSize": "max_batch_size",
    "maxInflightBatches": "max_inflight_batches",
    "maxItems": "max_items",
    "maxImageBytes": "max_image_bytes",
    "maxImagePixels": "max_image_pixels",
    "maxMessageBytes": "max_message_bytes",
    "maxConcurrentRpcs": "max_concurrent_rpcs",
    "maxInflightRequestBytes": "max_inflight_request_bytes",
    "maxPrompts": "max_prompts",
    "decodeBudgetPixels": "decode_budget_pixels",
    "localCacheBytes": "local_cache_bytes",
    "labelCacheItems": "label_cache_items",
    "httpHeaderTimeoutSeconds": "http_header_timeout_s",
    "httpBodyTimeoutSeconds": "http_body_timeout_s",
    "maxHttpBodyReads": "max_http_body_reads",
}


def test_limits_become_gateway_settings(rendered: dict[str, Rendered]) -> None:
    from service.settings import Settings

    limits = VALUE_SETS["sized"]["gateway"]["limits"]
    # The value set is one that can catch a swapped or ignored line: every limit set,
    # to values distinct from each other and from the defaults.
    assert set(limits) == set(LIMIT_SETTINGS)
    assert len(set(limits.values())) == len(limits), limits
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    assert all(limits[v] != defaults[s] for v, s in LIMIT_SETTINGS.items()), limits
    data = _gateway_config(rendered["sized"])
    rendered_limits = {s: data.get(f"CLIP_{s.upper()}") for s in LIMIT_SETTINGS.values()}
    assert rendered_limits == {s: str(limits[v]) for v, s in LIMIT_SETTINGS.items()}


def test_chart_limits_default_to_the_gateway_defaults() -> None:
    # The chart states every limit (so `helm get values --all` shows it), with the same
    # defaults as `clipsvc serve`; only deliberate differences belong in values.yaml.
    from service.settings import Settings

    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    limits = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["gateway"]["limits"]
    assert set(limits) == set(LIMIT_SETTINGS)
    for value, setting in LIMIT_SETTINGS.items():
        assert limits[value] == defaults[setting], value


def _decode_threads_env(r: Rendered) -> dict[str, Any] | None:
    return env_entries(_gateway_container(r)).get("CLIP_DECODE_THREADS")


def test_decode_threads_follow_the_cpu_limit(rendered: dict[str, Rendered]) -> None:
    # Without a CPU limit there is no cgroup quota, and the process would count the
    # node's CPUs; the downward API gives it the container's own (rounded up: 3500m → 4).
    r = rendered["sized"]
    assert _decode_threads_env(r) == {
        "name": "CLIP_DECODE_THREADS",
        "valueFrom": {
            "resourceFieldRef": {
                "containerName": "gateway",
                "resource": "limits.cpu",
                "divisor": "1",
            }
        },
    }
    assert "CLIP_DECODE_THREADS" not in _gateway_config(r)


def test_decode_threads_follow_the_cpu_request_without_a_limit(
    rendered: dict[str, Rendered],
) -> None:
    env = _decode_threads_env(rendered["defaults"])
    assert env is not None
    assert env["valueFrom"]["resourceFieldRef"] == {
        "containerName": "gateway",
        "resource": "requests.cpu",
        "divisor": "1",
    }
    # With no CPU figure at all the gateway counts the CPUs it may use itself.
    assert _decode_threads_env(rendered["no-cpu"]) is None
    assert "CLIP_DECODE_THREADS" not in _gateway_config(rendered["no-cpu"])


def test_decode_threads_set_by_hand(rendered: dict[str, Rendered]) -> None:
    r = rendered["decode-threads"]
    assert _decode_threads_env(r) is None
    assert _gateway_config(r)["CLIP_DECODE_THREADS"] == "6"


def test_gateway_service_has_named_ports(rendered: dict[str, Rendered]) -> None:
    svc = rendered["defaults"].one("Service", "gateway")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["grpc"]["targetPort"] == "grpc"
    assert ports["metrics"]["port"] == 9090 and ports["metrics"]["targetPort"] == "metrics"
    # The HTTP API (OpenAI-compatible) beside gRPC, on the container port of that name.
    assert ports["http"]["port"] == 8080 and ports["http"]["targetPort"] == "http"
    assert ports["http"]["appProtocol"] == "http"
    assert port_numbers(_gateway_container(rendered["defaults"]))["http"] == 8080


def test_the_http_port_follows_its_values(rendered: dict[str, Rendered]) -> None:
    r = rendered["http-ports"]
    ports = {p["name"]: p for p in r.one("Service", "gateway")["spec"]["ports"]}
    assert ports["http"]["port"] == 80
    assert port_numbers(_gateway_container(r))["http"] == 8081
    assert _gateway_config(r)["CLIP_HTTP_PORT"] == "8081"
    # Probes stay on the gRPC health port: the HTTP API is not what the kubelet asks.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert _gateway_container(r)[probe].get("httpGet") is None


@pytest.mark.parametrize("component", ["gateway", "triton"])
def test_headless_services_for_client_side_balancing(
    rendered: dict[str, Rendered], component: str
) -> None:
    r = rendered["defaults"]
    headless = r.one("Service", component, headless=True)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == r.one("Service", component)["spec"]["selector"]
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]


def test_config_change_rolls_the_pods(rendered: dict[str, Rendered]) -> None:
    def checksums(name: str) -> dict[str, str]:
        annotations = _gateway(rendered[name])["spec"]["template"]["metadata"]["annotations"]
        return {k: v for k, v in annotations.items() if k.startswith("checksum/")}

    before, after = checksums("defaults"), checksums("debug-log")
    assert before["checksum/config"] != after["checksum/config"]
    assert before["checksum/secret"] == after["checksum/secret"]


def test_api_keys_and_tls_from_existing_secrets(rendered: dict[str, Rendered]) -> None:
    r = rendered["tls-api-keys"]
    dep = _gateway(r)
    c = container(dep, "gateway")
    data = _gateway_config(r)
    vols, mnts = volumes(dep), mounts(c)

    keys_volume = vols["api-keys"]["secret"]
    assert keys_volume["secretName"] == "clip-api-keys"
    assert keys_volume["items"] == [{"key": "keys.txt", "path": "api-keys"}]
    assert mnts["api-keys"]["readOnly"] is True
    assert "subPath" not in mnts["api-keys"]  # a subPath mount would never see rotations
    assert data["CLIP_API_KEYS_FILE"] == f"{mnts['api-keys']['mountPath']}/api-keys"

    assert vols["tls"]["secret"]["secretName"] == "clip-tls"
    assert data["CLIP_TLS_CERT"] == f"{mnts['tls']['mountPath']}/tls.crt"
    assert data["CLIP_TLS_KEY"] == f"{mnts['tls']['mountPath']}/tls.key"
    assert vols["client-ca"]["secret"]["secretName"] == "clip-client-ca"
    assert data["CLIP_TLS_CLIENT_CA"] == f"{mnts['client-ca']['mountPath']}/ca.crt"
    # Existing Secrets are referenced, never created by the chart (the Redis password is
    # the chart's own).
    assert [s["metadata"]["labels"]["app.kubernetes.io/component"] for s in r.all("Secret")] == [
        "redis"
    ]


@pytest.mark.parametrize("name", ["tls", "api-keys", "tls-api-keys"])
def test_keys_and_certificates_are_mounted_as_directories(
    rendered: dict[str, Rendered], name: str
) -> None:
    # The gateway re-reads the key file and the certificates when they change; the kubelet
    # updates a Secret mounted as a directory, but never a subPath mount.
    r = rendered[name]
    dep = _gateway(r)
    c = container(dep, "gateway")
    secret_mounts = {
        mount["mountPath"]: mount
        for volume, mount in mounts(c).items()
        if "secret" in volumes(dep)[volume]
    }
    assert secret_mounts
    for mount in secret_mounts.values():
        assert "subPath" not in mount and "subPathExpr" not in mount, mount
        assert mount["readOnly"] is True
    files = [
        value
        for key, value in _gateway_config(r).items()
        if key in ("CLIP_API_KEYS_FILE", "CLIP_TLS_CERT", "CLIP_TLS_KEY", "CLIP_TLS_CLIENT_CA")
    ]
    assert files
    for path in files:
        assert str(Path(path).parent) in secret_mounts, path


def test_inline_api_keys_become_a_mounted_secret(rendered: dict[str, Rendered]) -> None:
    r = rendered["api-keys"]
    dep = _gateway(r)
    secret_name = volumes(dep)["api-keys"]["secret"]["secretName"]
    secret = r.named("Secret", secret_name)
    keys = base64.b64decode(secret["data"]["api-keys"]).decode()
    assert keys.splitlines() == ["key-one", "key-two"]
    assert "key-one" not in json.dumps(r.one("ConfigMap", "gateway"))


# ------------------------------------------------------------------ triton


def test_triton_gets_gpus_by_default(rendered: dict[str, Rendered]) -> None:
    c = container(_triton(rendered["defaults"]), "triton")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "--model-repository=/models" in c["args"]
    assert "--strict-model-config=true" in c["args"]
    assert c["args"][0] == "tritonserver"
    tolerations = pod_spec(_triton(rendered["defaults"]))["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_triton_probes_use_the_v2_health_endpoints(rendered: dict[str, Rendered]) -> None:
    c = container(_triton(rendered["defaults"]), "triton")
    assert port_numbers(c) == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = c["startupProbe"]
    assert startup["httpGet"]["port"] == "http"
    # Loading large TorchScript models onto a GPU can take many minutes.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    svc = rendered["defaults"].one("Service", "triton")
    assert {p["name"] for p in svc["spec"]["ports"]} == {"http", "grpc", "metrics"}


def test_triton_exit_timeout_fits_in_the_grace_period(rendered: dict[str, Rendered]) -> None:
    dep = _triton(rendered["defaults"])
    args = container(dep, "triton")["args"]
    exit_timeout = int(next(a for a in args if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert pod_spec(dep)["terminationGracePeriodSeconds"] > exit_timeout


def test_cpu_only_triton_has_no_gpus_and_rewrites_kind(rendered: dict[str, Rendered]) -> None:
    dep = _triton(rendered["cpu-triton"])
    c = container(dep, "triton")
    for section in ("limits", "requests"):
        assert not any("gpu" in key for key in c["resources"].get(section, {}))
    assert "--allow-gpu-metrics=false" in c["args"]
    served = next(a for a in c["args"] if a.startswith("--model-repository=")).split("=")[1]
    rewrite = init_container(dep, "model-config")
    assert rewrite is not None
    script = rewrite["command"][-1]
    assert "KIND_GPU/KIND_CPU" in script
    assert env_entries(rewrite)["SERVED_REPOSITORY"]["value"] == served
    assert mounts(c)["served-model-repository"]["mountPath"] == served
    assert "tolerations" not in pod_spec(dep)


def _fake_repository(root: Path) -> Path:
    """A model repository shaped like `clipsvc export --flavor pytorch` output."""
    for name in ("clip_image", "clip_text"):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.pt").write_bytes(b"torchscript")
        (root / name / "config.pbtxt").write_text(
            f'name: "{name}"\nplatform: "pytorch_libtorch"\ninstance_group [\n'
            "  { count: 2 kind: KIND_GPU gpus: [ 0, 1 ] }\n]\n"
        )
    (root / "metadata.json").write_text("{}")
    return root


def test_cpu_config_script_rewrites_only_the_configs(
    rendered: dict[str, Rendered], tmp_path: Path
) -> None:
    # Runs the init container's script as rendered, against a repository on disk.
    script = init_container(_triton(rendered["cpu-triton"]), "model-config")["command"]
    assert script[:2] == ["bash", "-ec"]
    source = _fake_repository(tmp_path / "models")
    served = tmp_path / "served"
    served.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "MODEL_REPOSITORY": str(source),
        "SERVED_REPOSITORY": str(served),
    }
    for _ in range(2):  # a restarted pod runs it again over the same emptyDir
        done = subprocess.run(script, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    for name in ("clip_image", "clip_text"):
        config = (served / name / "config.pbtxt").read_text()
        assert "KIND_CPU" in config and "KIND_GPU" not in config and "gpus" not in config
        assert not (served / name / "config.pbtxt").is_symlink()
        assert "KIND_GPU" in (source / name / "config.pbtxt").read_text()
        weights = served / name / "1" / "model.pt"
        assert weights.is_symlink()
        assert weights.resolve() == (source / name / "1" / "model.pt").resolve()
    assert (served / "metadata.json").read_text() == "{}"


def test_fetch_models_default_command_copies_the_repository(
    rendered: dict[str, Rendered], tmp_path: Path
) -> None:
    fetch = init_container(_triton(rendered["init-container-models"]), "fetch-models")
    source = _fake_repository(tmp_path / "image-models")
    target = tmp_path / "emptydir"
    target.mkdir()
    env = {"PATH": os.environ["PATH"], "SOURCE_PATH": str(source), "MODEL_REPOSITORY": str(target)}
    for _ in range(2):
        done = subprocess.run(
            fetch["command"], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
    assert (target / "clip_text" / "1" / "model.pt").read_bytes() == b"torchscript"
    assert (target / "metadata.json").exists()


def test_cpu_rewrite_runs_after_the_model_copy(rendered: dict[str, Rendered]) -> None:
    init_names = [
        c["name"] for c in pod_spec(_triton(rendered["cpu-triton-init"]))["initContainers"]
    ]
    assert init_names == ["fetch-models", "model-config"]


def test_model_repository_from_a_pvc(rendered: dict[str, Rendered]) -> None:
    r = rendered["pvc-models"]
    dep = _triton(r)
    claim = volumes(dep)["model-repository"]["persistentVolumeClaim"]
    assert claim == {"claimName": "clip-models", "readOnly": True}
    mount = mounts(container(dep, "triton"))["model-repository"]
    assert mount == {
        "name": "model-repository",
        "mountPath": "/models",
        "subPath": "vit-b-32",
        "readOnly": True,
    }
    gateway = _gateway(r)
    assert volumes(gateway)["model-repository"]["persistentVolumeClaim"]["claimName"] == (
        "clip-models"
    )
    gw_mount = mounts(container(gateway, "gateway"))["model-repository"]
    assert gw_mount["mountPath"] == _gateway_config(r)["CLIP_MODEL_REPOSITORY"]
    assert gw_mount["readOnly"] is True


def test_model_repository_from_an_init_container(rendered: dict[str, Rendered]) -> None:
    dep = _triton(rendered["init-container-models"])
    assert "emptyDir" in volumes(dep)["model-repository"]
    fetch = init_container(dep, "fetch-models")
    assert fetch is not None
    assert fetch["image"].startswith("ghcr.io/example/clip-service-models:")
    assert mounts(fetch)["model-repository"]["mountPath"] == "/models"
    assert "readOnly" not in mounts(fetch)["model-repository"]
    assert mounts(container(dep, "triton"))["model-repository"]["readOnly"] is True
    assert env_entries(fetch)["MODEL_REPOSITORY"]["value"] == "/models"


def test_image_model_repository_mounts_nothing(rendered: dict[str, Rendered]) -> None:
    dep = _triton(rendered["defaults"])
    assert "model-repository" not in volumes(dep)
    assert "initContainers" not in pod_spec(dep)


# ------------------------------------------------------------------ redis


def test_builtin_redis_is_a_bounded_lru_cache(rendered: dict[str, Rendered]) -> None:
    c = container(rendered["defaults"].one("Deployment", "redis"), "redis")
    args = c["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert args[args.index("--maxmemory") + 1] == "768mb"
    assert args[args.index("--save") + 1] == ""


def _redis_password_refs(r: Rendered) -> tuple[dict[str, str], dict[str, str]]:
    """Where Redis and the gateway take the password from (secretKeyRefs)."""
    redis = container(r.one("Deployment", "redis"), "redis")
    gateway = _gateway_container(r)
    return (
        env_entries(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"],
        env_entries(gateway)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"],
    )


def test_builtin_redis_requires_a_generated_password_by_default(
    rendered: dict[str, Rendered],
) -> None:
    r = rendered["defaults"]
    redis = container(r.one("Deployment", "redis"), "redis")
    assert redis["args"][redis["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert "--protected-mode" not in redis["args"]
    redis_ref, gateway_ref = _redis_password_refs(r)
    assert gateway_ref == redis_ref
    secret = r.named("Secret", redis_ref["name"])
    assert secret["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"
    password = base64.b64decode(secret["data"][redis_ref["key"]]).decode()
    # URL-safe, because it goes into the gateway's redis:// URL unescaped.
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password), password
    # The readiness probe's redis-cli authenticates from the same Secret.
    assert env_entries(redis)["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == redis_ref

    gateway = _gateway_container(r)
    names = [e["name"] for e in gateway["env"]]
    # $(VAR) expansion only sees variables defined earlier in the list.
    assert names.index("REDIS_PASSWORD") < names.index("CLIP_REDIS_URL")
    svc = r.one("Service", "redis")
    assert env_entries(gateway)["CLIP_REDIS_URL"]["value"] == (
        f"redis://:$(REDIS_PASSWORD)@{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}/0"
    )
    assert "CLIP_REDIS_URL" not in _gateway_config(r)
    annotations = _gateway(r)["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/redis-secret" in annotations


def test_generated_redis_password_survives_upgrades(helm: str) -> None:
    # `helm upgrade` renders with `lookup` against the cluster: the Secret made at install
    # must keep its password, or every running gateway is locked out of the cache until
    # it restarts. A loopback API server plays the cluster.
    name = f"{RELEASE}-clip-service-redis"
    installed = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "type": "Opaque",
        "data": {"redis-password": base64.b64encode(b"kept-from-install").decode()},
    }

    def render(*secrets: dict[str, Any]) -> tuple[Rendered, list[str]]:
        with fake_kube_api(*secrets) as (kubeconfig, requests):
            done = template(helm, None, "--dry-run=server", "--kubeconfig", str(kubeconfig))
            assert done.returncode == 0, done.stderr
            return Rendered.from_yaml(done.stdout), list(requests)

    def password(r: Rendered) -> str:
        return base64.b64decode(r.named("Secret", name)["data"]["redis-password"]).decode()

    def checksum(r: Rendered) -> str:
        return _gateway(r)["spec"]["template"]["metadata"]["annotations"]["checksum/redis-secret"]

    upgrade, requests = render(installed)
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{name}" in requests
    assert password(upgrade) == "kept-from-install"
    # Same Secret, same checksum: an upgrade does not roll the pods over the password.
    assert checksum(render(installed)[0]) == checksum(upgrade)
    # A first install finds nothing and generates one.
    install, _ = render()
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password(install))


def test_builtin_redis_is_reachable_only_from_the_gateways_by_default(
    rendered: dict[str, Rendered],
) -> None:
    r = rendered["defaults"]
    assert r.maybe("NetworkPolicy", "gateway") is None  # networkPolicy.enabled stays off
    spec = r.one("NetworkPolicy", "redis")["spec"]
    assert (
        spec["podSelector"]["matchLabels"]
        == (r.one("Deployment", "redis")["spec"]["selector"]["matchLabels"])
    )
    assert spec["policyTypes"] == ["Ingress"]
    gateway_pods = _gateway(r)["spec"]["selector"]["matchLabels"]
    assert spec["ingress"] == [
        {
            "ports": [{"port": "redis", "protocol": "TCP"}],
            "from": [{"podSelector": {"matchLabels": gateway_pods}}],
        }
    ]


def test_builtin_redis_password_from_an_existing_secret(rendered: dict[str, Rendered]) -> None:
    r = rendered["redis-auth-existing"]
    redis_ref, gateway_ref = _redis_password_refs(r)
    assert redis_ref == gateway_ref == {"name": "cache-pw", "key": "pw"}
    assert r.all("Secret") == []
    # Nothing of the chart's changes when that Secret does: no checksum to roll on.
    annotations = _gateway(r)["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/redis-secret" not in annotations


def test_builtin_redis_can_be_opened_explicitly(rendered: dict[str, Rendered]) -> None:
    r = rendered["redis-open"]
    redis = container(r.one("Deployment", "redis"), "redis")
    assert "--requirepass" not in redis["args"]
    assert redis["args"][redis["args"].index("--protected-mode") + 1] == "no"
    assert "env" not in redis
    assert r.all("Secret") == [] and r.all("NetworkPolicy") == []
    svc = r.one("Service", "redis")
    assert _gateway_config(r)["CLIP_REDIS_URL"] == (
        f"redis://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}/0"
    )
    assert "REDIS_PASSWORD" not in env_entries(_gateway_container(r))


def test_external_redis_url_stays_secret(rendered: dict[str, Rendered]) -> None:
    r = rendered["external-redis"]
    assert r.maybe("Deployment", "redis") is None
    assert r.maybe("Service", "redis") is None
    assert "CLIP_REDIS_URL" not in _gateway_config(r)
    ref = env_entries(_gateway_container(r))["CLIP_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    secret = r.named("Secret", ref["name"])
    url = base64.b64decode(secret["data"][ref["key"]]).decode()
    assert url == "redis://:s3cret@cache.example:6379/2"
    assert "s3cret" not in json.dumps(r.one("ConfigMap", "gateway"))


def test_external_redis_from_an_existing_secret(rendered: dict[str, Rendered]) -> None:
    r = rendered["external-redis-secret"]
    ref = env_entries(_gateway_container(r))["CLIP_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "shared-redis", "key": "url"}
    assert r.all("Secret") == []


def test_embedded_only_deploys_just_the_gateway(rendered: dict[str, Rendered]) -> None:
    r = rendered["embedded-only"]
    assert [d["metadata"]["name"] for d in r.all("Deployment")] == ["rel-clip-service-gateway"]
    data = _gateway_config(r)
    assert data["CLIP_BACKEND"] == "embedded"
    assert "CLIP_TRITON_URL" not in data and "CLIP_REDIS_URL" not in data
    assert list(env_entries(_gateway_container(r))) == ["CLIP_DECODE_THREADS"]


# ------------------------------------------------------------------ scaling, network, scrape


def test_hpa_owns_the_replica_count(rendered: dict[str, Rendered]) -> None:
    r = rendered["hpa-netpol"]
    hpa = r.one("HorizontalPodAutoscaler", "gateway")
    dep = _gateway(r)
    assert "replicas" not in dep["spec"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"]}
    assert resources == {"cpu", "memory"}
    assert rendered["defaults"].maybe("HorizontalPodAutoscaler", "gateway") is None


def test_triton_pdb_only_with_two_or_more_replicas(rendered: dict[str, Rendered]) -> None:
    # One replica: a PDB would block drains (or protect nothing), so none is rendered.
    assert rendered["defaults"].maybe("PodDisruptionBudget", "triton") is None
    for name in ("triton-scaled", "autoscaled"):
        r = rendered[name]
        pdb = r.one("PodDisruptionBudget", "triton")["spec"]
        assert pdb["maxUnavailable"] == 1  # a drain may take one; the others keep serving
        assert pdb["selector"]["matchLabels"] == _triton(r)["spec"]["selector"]["matchLabels"]


def test_triton_hpa_scales_on_queue_time_per_request(rendered: dict[str, Rendered]) -> None:
    r = rendered["autoscaled"]
    dep = _triton(r)
    assert "replicas" not in dep["spec"]
    hpa = r.one("HorizontalPodAutoscaler", "triton")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "50000"}
    assert metric["pods"]["metric"]["name"] in _adapter_rules(r)
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert rendered["defaults"].maybe("HorizontalPodAutoscaler", "triton") is None
    assert _triton(rendered["defaults"])["spec"]["replicas"] == 1


def test_gateway_hpa_also_scales_on_queued_items(rendered: dict[str, Rendered]) -> None:
    r = rendered["autoscaled"]
    metrics = r.one("HorizontalPodAutoscaler", "gateway")["spec"]["metrics"]
    [queued] = [m for m in metrics if m["type"] == "Pods"]
    assert queued["pods"]["metric"]["name"] == "clip_queued_items"
    assert queued["pods"]["target"] == {"type": "AverageValue", "averageValue": "64"}
    assert queued["pods"]["metric"]["name"] in _adapter_rules(r)
    assert {m["type"] for m in metrics} == {"Resource", "Pods"}
    # Off by default: CPU alone, no custom metrics API needed.
    others = rendered["hpa-netpol"].one("HorizontalPodAutoscaler", "gateway")["spec"]["metrics"]
    assert {m["type"] for m in others} == {"Resource"}


def _adapter_rules(r: Rendered) -> dict[str, dict[str, Any]]:
    """prometheus-adapter rules of the adapter-rules ConfigMap, by the metric name served."""
    config = yaml.safe_load(r.one("ConfigMap", "adapter-rules")["data"]["config.yaml"])
    return {rule["name"]["as"]: rule for rule in config["rules"]}


def test_adapter_rules_serve_what_the_autoscalers_read(rendered: dict[str, Rendered]) -> None:
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    rules = _adapter_rules(rendered["autoscaled"])
    assert set(rules) == {"clip_queued_items", "clip_triton_queue_us_per_request"}
    for rule in rules.values():
        # Pods metrics: each series maps to the pod (and namespace) it was scraped from.
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert "by (<<.GroupBy>>)" in rule["metricsQuery"]
    # The gateway rule reads a gauge this gateway really exports.
    exported = generate_latest(Metrics().registry).decode()
    assert re.search(r"^clip_queued_items ", exported, flags=re.MULTILINE)
    assert rules["clip_queued_items"]["seriesQuery"].startswith("clip_queued_items{")
    # Triton's: queue microseconds over successful requests, both as rates of the window.
    triton = rules["clip_triton_queue_us_per_request"]
    assert triton["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    numerator, denominator = triton["metricsQuery"].split(" / ")
    assert "rate(nv_inference_queue_duration_us{<<.LabelMatchers>>}[3m])" in numerator
    assert "rate(nv_inference_request_success{<<.LabelMatchers>>}[3m])" in denominator
    assert rendered["defaults"].maybe("ConfigMap", "adapter-rules") is None


def test_instances_per_gpu_rewrite_the_configs(
    rendered: dict[str, Rendered], tmp_path: Path
) -> None:
    dep = _triton(rendered["triton-scaled"])
    c = container(dep, "triton")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    served = next(a for a in c["args"] if a.startswith("--model-repository=")).split("=")[1]
    assert mounts(c)["served-model-repository"]["mountPath"] == served
    script = init_container(dep, "model-config")["command"]
    source = _fake_repository(tmp_path / "models")
    target = tmp_path / "served"
    target.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "MODEL_REPOSITORY": str(source),
        "SERVED_REPOSITORY": str(target),
    }
    done = subprocess.run(script, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    for name in ("clip_image", "clip_text"):
        config = (target / name / "config.pbtxt").read_text()
        # Still on the GPUs, now 3 instances on each (the export said 2).
        assert "{ count: 3 kind: KIND_GPU" in config
        assert "count: 2" not in config
    # Without the override the GPU pod serves the repository as exported: no init container.
    assert init_container(_triton(rendered["defaults"]), "model-config") is None


def test_network_policies_isolate_triton_and_redis(rendered: dict[str, Rendered]) -> None:
    r = rendered["hpa-netpol"]
    gateway_pods = _gateway(r)["spec"]["selector"]["matchLabels"]

    gw = r.one("NetworkPolicy", "gateway")["spec"]
    rules = {rule["ports"][0]["port"]: rule for rule in gw["ingress"]}
    assert rules["grpc"]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "search"}}}]
    assert rules["http"]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "rag"}}}]
    assert rules["http"]["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert rules["metrics"]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }

    for component in ("triton", "redis"):
        spec = r.one("NetworkPolicy", component)["spec"]
        assert (
            spec["podSelector"]["matchLabels"]
            == r.one("Deployment", component)["spec"]["selector"]["matchLabels"]
        )
        serving = spec["ingress"][0]
        assert serving["from"] == [{"podSelector": {"matchLabels": gateway_pods}}]
        assert "metrics" not in {p["port"] for p in serving["ports"]}


def test_service_monitors(rendered: dict[str, Rendered]) -> None:
    r = rendered["monitoring"]
    monitors = r.all("ServiceMonitor")
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors} == {
        "gateway",
        "triton",
    }
    for sm in monitors:
        # No CRD schema here: check the fields the Prometheus Operator reads.
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
        assert sm["metadata"]["namespace"] == "monitoring"
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        spec = sm["spec"]
        assert set(spec) <= {"selector", "endpoints", "namespaceSelector"}
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        component = sm["metadata"]["labels"]["app.kubernetes.io/component"]
        svc = r.one("Service", component)
        assert spec["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        # The headless twin carries the same labels but no metrics port: excluded.
        assert spec["selector"]["matchExpressions"] == [
            {"key": "clip-service/headless", "operator": "DoesNotExist"}
        ]
        svc_ports = {p["name"] for p in svc["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
            assert endpoint["port"] in svc_ports
            assert endpoint["path"] == "/metrics"
            assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    annotations = _gateway(r)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9090"
    assert rendered["defaults"].all("ServiceMonitor") == []


def test_long_names_are_truncated_but_distinct(rendered: dict[str, Rendered]) -> None:
    r = rendered["long-names"]
    names = [d["metadata"]["name"] for d in r.docs]
    assert all(len(n) <= 63 for n in names)
    services = [s["metadata"]["name"] for s in r.all("Service")]
    assert len(set(services)) == len(services) == 5
    assert sorted(n[n.index("-") + 1 :] for n in services) == [
        "gateway",
        "gateway-headless",
        "redis",
        "triton",
        "triton-headless",
    ]


# ------------------------------------------------------------------ values and schema


SCHEMA_ERROR = "don't meet the specifications of the schema"
TOO_SMALL = "greater than or equal to"

#: values → (where the schema error must point, what it must say).
BAD_VALUES: dict[str, tuple[dict[str, Any], str, str]] = {
    "replicaCount-string": ({"gateway": {"replicaCount": "two"}}, "gateway.replicaCount", ""),
    "redis-mode": ({"redis": {"mode": "sometimes"}}, "redis.mode", ""),
    "negative-port": (
        {"gateway": {"service": {"grpcPort": -1}}},
        "gateway.service.grpcPort",
        TOO_SMALL,
    ),
    "unknown-top-level": ({"replicas": 3}, "replicas", ""),
    "unknown-nested": ({"gateway": {"replicas": 3}}, "replicas", ""),
    "model-source": ({"triton": {"modelRepository": {"source": "s3"}}}, "source", ""),
    "zero-gpus": ({"triton": {"gpu": {"count": 0}}}, "triton.gpu.count", TOO_SMALL),
    "backend": ({"gateway": {"backend": "onnx"}}, "gateway.backend", ""),
    "zero-inflight": (
        {"gateway": {"limits": {"maxInflightBatches": 0}}},
        "gateway.limits.maxInflightBatches",
        TOO_SMALL,
    ),
    "extra-config-name": ({"gateway": {"extraConfig": {"PORT": "1"}}}, "extraConfig", ""),
    "negative-rpc-cap": (
        {"gateway": {"limits": {"maxConcurrentRpcs": -1}}},
        "gateway.limits.maxConcurrentRpcs",
        TOO_SMALL,
    ),
    "zero-prompts": (
        {"gateway": {"limits": {"maxPrompts": 0}}},
        "gateway.limits.maxPrompts",
        TOO_SMALL,
    ),
    # Megapixels where pixels are meant: a budget of 64 would decode one image at a time.
    "budget-in-megapixels": (
        {"gateway": {"limits": {"decodeBudgetPixels": 64}}},
        "gateway.limits.decodeBudgetPixels",
        TOO_SMALL,
    ),
    "negative-cache-bytes": (
        {"gateway": {"limits": {"localCacheBytes": -1}}},
        "gateway.limits.localCacheBytes",
        TOO_SMALL,
    ),
    "label-cache-string": (
        {"gateway": {"limits": {"labelCacheItems": "many"}}},
        "gateway.limits.labelCacheItems",
        "Invalid type",
    ),
    "negative-decode-threads": (
        {"gateway": {"decodeThreads": -1}},
        "gateway.decodeThreads",
        TOO_SMALL,
    ),
    "privileged-health-port": (
        {"gateway": {"containerPorts": {"health": 80}}},
        "gateway.containerPorts.health",
        TOO_SMALL,
    ),
    # Any other name is NOT_FOUND to the health service: the pod would never be ready.
    "readiness-service": (
        {"gateway": {"probes": {"grpcService": "liveness"}}},
        "gateway.probes.grpcService",
        "must be one of",
    ),
    "zero-queue-target": (
        {"triton": {"autoscaling": {"targetQueueMicroseconds": 0}}},
        "triton.autoscaling.targetQueueMicroseconds",
        TOO_SMALL,
    ),
    "negative-queued-items": (
        {"gateway": {"autoscaling": {"targetQueuedItems": -1}}},
        "gateway.autoscaling.targetQueuedItems",
        TOO_SMALL,
    ),
    "negative-instances": (
        {"triton": {"gpu": {"instancesPerGpu": -1}}},
        "triton.gpu.instancesPerGpu",
        TOO_SMALL,
    ),
    # A PromQL range needs a unit: "2 minutes" or "120" would break every rule.
    "adapter-window": (
        {"monitoring": {"prometheusAdapter": {"window": "120"}}},
        "monitoring.prometheusAdapter.window",
        "Does not match pattern",
    ),
    "redis-policy-string": (
        {"redis": {"builtin": {"networkPolicy": {"enabled": "yes"}}}},
        "redis.builtin.networkPolicy.enabled",
        "Invalid type",
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_schema_rejects_bad_values(helm: str, case: str) -> None:
    values, where, why = BAD_VALUES[case]
    done = template(helm, values)
    assert done.returncode != 0
    assert SCHEMA_ERROR in done.stderr, done.stderr
    assert where in done.stderr, done.stderr
    assert why in done.stderr, done.stderr


CROSS_FIELD_ERRORS = {
    "grace-too-short": (
        {"gateway": {"terminationGracePeriodSeconds": 20}},
        "terminationGracePeriodSeconds",
    ),
    "pvc-without-claim": ({"triton": {"modelRepository": {"source": "pvc"}}}, "existingClaim"),
    "keys-without-keys": ({"gateway": {"apiKeys": {"enabled": True}}}, "gateway.apiKeys"),
    "tls-without-secret": ({"gateway": {"tls": {"enabled": True}}}, "gateway.tls"),
    "external-without-url": ({"redis": {"mode": "external"}}, "redis.external"),
    "triton-nowhere": ({"triton": {"enabled": False}}, "gateway.tritonUrl"),
    "triton-hpa-without-triton": (
        {
            "triton": {"enabled": False, "autoscaling": {"enabled": True}},
            "gateway": {"tritonUrl": "triton.example:8001"},
        },
        "triton.autoscaling.enabled needs triton.enabled",
    ),
    "triton-hpa-min-over-max": (
        {"triton": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        "triton.autoscaling.minReplicas",
    ),
    "health-on-the-grpc-port": (
        {"gateway": {"containerPorts": {"health": 50051}}},
        "must be three different ports",
    ),
}


@pytest.mark.parametrize("case", list(CROSS_FIELD_ERRORS))
def test_cross_field_errors_fail_with_a_message(helm: str, case: str) -> None:
    values, where = CROSS_FIELD_ERRORS[case]
    done = template(helm, values)
    assert done.returncode != 0
    assert where in done.stderr, done.stderr


def _params() -> dict[str, str]:
    text = (CHART_DIR / "values.yaml").read_text()
    return dict(re.findall(r"^\s*## @param (\S+) (.+)$", text, flags=re.MULTILINE))


def test_every_value_is_documented_in_values_and_schema() -> None:
    params = _params()
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"

    def schema_node(path: str) -> dict[str, Any]:
        node = schema
        for key in path.split("."):
            node = node["properties"][key]
        return node

    documented_prefixes = tuple(f"{p}." for p in params)
    for path, value in leaf_paths(values):
        if path.startswith(documented_prefixes):
            continue  # inside a value documented as a whole (resources, securityContext)
        if isinstance(value, dict) and value and path not in params:
            continue  # a section: its children carry the docs
        assert path in params, f"values.yaml: no ## @param for {path}"
    for path, description in params.items():
        node = schema_node(path)
        assert node.get("description") == description, f"schema description of {path}"
        assert "type" in node, f"schema type of {path}"


def test_schema_is_strict_about_unknown_keys() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    sections = [schema, *(schema["properties"][k] for k in ("gateway", "triton", "redis"))]
    for node in sections:
        assert node["additionalProperties"] is False
        assert set(node["required"]) <= set(node["properties"])


def test_notes_render_usage(helm: str, tmp_path: Path) -> None:
    # `helm template` never prints NOTES.txt; render it through a throwaway template.
    chart = tmp_path / "clip-service"
    shutil.copytree(CHART_DIR, chart)
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ include "clip-service/templates/NOTES.txt" . | quote }}\n'
    )

    def notes(name: str) -> str:
        done = template(
            helm, VALUE_SETS[name], "--show-only", "templates/zz-notes.yaml", chart=chart
        )
        assert done.returncode == 0, done.stderr
        return yaml.safe_load(done.stdout)["data"]["notes"]

    text = notes("api-keys")
    assert f"port-forward svc/{RELEASE}-clip-service-gateway 50051:50051" in text
    assert "grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check" in text
    assert "authorization: Bearer $CLIP_API_KEY" in text
    assert f"{RELEASE}-clip-service-triton.{NAMESPACE}.svc:8002/metrics" in text
    # Where the probes go, and how to ask the same question with TLS on.
    assert f"port-forward deploy/{RELEASE}-clip-service-gateway 50052:50052" in text
    assert "grpcurl -plaintext localhost:50052 grpc.health.v1.Health/Check" in text
    assert f"password in Secret {RELEASE}-clip-service-redis" in text
    assert "only the gateways may connect" in text
    assert "grpcurl -plaintext localhost:50052" in notes("tls")
    opened = notes("redis-open")
    assert "NO password" in opened and "NO NetworkPolicy" in opened


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("triton.example:8001", True),
        ("dns:///triton-headless.ml.svc:8001", True),
        ("ipv4:10.0.0.1:8001,10.0.0.2:8001", True),
        ("http://triton:8001", False),
        ("dns:///triton-headless", False),
    ],
)
def test_the_triton_url_takes_any_grpc_target(helm: str, url: str, accepted: bool) -> None:
    done = template(helm, {"gateway": {"tritonUrl": url}})
    assert (done.returncode == 0) is accepted, done.stderr
    if accepted:
        cm = Rendered.from_yaml(done.stdout).one("ConfigMap", "gateway")
        assert cm["data"]["CLIP_TRITON_URL"] == url


def test_tracing_values_reach_the_gateway_and_triton(
    helm: str, rendered: dict[str, Rendered]
) -> None:
    assert "CLIP_OTLP_ENDPOINT" not in _gateway_config(rendered["defaults"])
    assert not any(
        "trace-config" in a for a in container(_triton(rendered["defaults"]), "triton")["args"]
    )
    values = {
        "gateway": {"tracing": {"otlpEndpoint": "http://otel-collector.obs:4317"}},
        "triton": {"tracing": {"otlpUrl": "http://otel-collector.obs:4318/v1/traces", "rate": 10}},
    }
    done = template(helm, values)
    assert done.returncode == 0, done.stderr
    r = Rendered.from_yaml(done.stdout)
    config = _gateway_config(r)
    assert config["CLIP_OTLP_ENDPOINT"] == "http://otel-collector.obs:4317"
    assert config["CLIP_OTLP_SERVICE_NAME"] == "clip-gateway"
    args = container(_triton(r), "triton")["args"]
    assert "--trace-config=mode=opentelemetry" in args and "--trace-config=rate=10" in args
    assert "--trace-config=opentelemetry,url=http://otel-collector.obs:4318/v1/traces" in args
    bad = template(helm, {"gateway": {"tracing": {"otlpEndpoint": "collector:4317"}}})
    assert bad.returncode != 0 and "otlpEndpoint" in bad.stderr
