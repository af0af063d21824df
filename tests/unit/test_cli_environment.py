"""`clipsvc` sets OMP_WAIT_POLICY=PASSIVE (unless the caller set it) before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest

from tests.support.paths import REPO_ROOT

# A fresh interpreter runs `clipsvc serve` (`service.cli.main`) with the wiring replaced
# by a probe, so it reports what the gateway would start with and loads no model.
_PROBE = """
import json, os, sys, types
probe = types.ModuleType("service.wiring")
async def serve(settings):
    print(json.dumps({"omp": os.environ.get("OMP_WAIT_POLICY"), "torch": "torch" in sys.modules}))
probe.serve = serve
sys.modules["service.wiring"] = probe
from service.cli import main
sys.exit(main(["serve", "--model-repository", "unused", "--log-level", "WARNING"]))
"""


def _serve_sees(environment: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_clipsvc_is_service_cli_main() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["clipsvc"] == "service.cli:main"


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_omp_wait_policy_is_passive_unless_set(given: str | None, expected: str) -> None:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        environment["OMP_WAIT_POLICY"] = given
    seen = _serve_sees(environment)
    assert seen["omp"] == expected
    # Set before torch (and its OpenMP runtime, which reads it once) was loaded.
    assert seen["torch"] is False
