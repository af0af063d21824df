"""Dependencies split by role: the base install is the gateway; torch & co. are extras.

tests/integration/test_gateway_without_torch.py serves without them; here, the static side
(what pyproject.toml declares) and the error that names a missing extra.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from tests.support.blocked_imports import BLOCKED
from tests.support.paths import REPO_ROOT

PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
# Distribution names of the packages the gateway must not import.
HEAVY = {"torch", "torchvision", "open-clip-torch", "transformers", "timm", "onnx", "onnxscript",
         "sentencepiece", "huggingface-hub", "pymilvus", "milvus-lite", "pandas"}  # fmt: skip


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pins(path: str = "constraints.txt") -> dict[str, str]:
    lines = (REPO_ROOT / path).read_text().splitlines()
    return {
        _name(line): line.split("==")[1] for line in lines if "==" in line and not line[0] == "#"
    }


def test_the_base_install_carries_none_of_torch_open_clip_transformers() -> None:
    base = {_name(r) for r in PROJECT["dependencies"]}
    assert not base & HEAVY, base & HEAVY
    # The import blocker the integration tests use covers the same packages.
    assert {"torch", "torchvision", "open_clip", "transformers", "huggingface_hub"} <= BLOCKED


def test_extras_carry_them_with_torch_pinned_as_in_constraints() -> None:
    extras = PROJECT["optional-dependencies"]
    export = {_name(r): r for r in extras["export"]}
    assert {"torch", "torchvision", "open-clip-torch", "transformers", "onnx", "onnxscript",
            "sentencepiece"} <= set(export)  # fmt: skip
    pins = _pins()
    # torch and torchvision must be this pair (2.13 + PyPI's torchvision did not import).
    assert export["torch"] == f"torch=={pins['torch']}" == "torch==2.14.1"
    assert export["torchvision"] == f"torchvision=={pins['torchvision']}" == "torchvision==0.29.1"
    assert extras["torchscript"] == [export["torch"]]
    # The local tritonserver's python backend runs model.pt with torch.
    assert "clip-service[torchscript]" in extras["triton"]
    # The catalog's client and engine (pymilvus brings pandas) are an extra as well.
    assert {_name(r) for r in extras["catalog"]} == {"pymilvus", "milvus-lite"}


def test_export_without_its_extra_names_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.blocked_imports", "service.cli", "export",
         "--model", "clip-demo-shapes", "--pretrained", "none", "--out", "/nonexistent/out"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "clipsvc: clipsvc export needs open_clip, which the gateway install leaves out: "
        "pip install 'clip-service[export]'"
    )
