"""The README stays true: its settings table matches the code, its commands exist."""

from __future__ import annotations

import subprocess
import sys

from tests.support.paths import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def test_settings_table_matches_the_settings_object() -> None:
    table = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "settings_table.py")],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    ).stdout
    assert table.strip() in README, (
        "README settings table is stale: rerun scripts/settings_table.py"
    )


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make run", "make test"]
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()


def test_cli_commands_in_the_readme_exist() -> None:
    from service.cli import build_parser

    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    used = {
        line.split("clipsvc ", 1)[1].split()[0]
        for line in README.splitlines()
        if "bin/clipsvc " in line
    }
    assert used and used <= commands, used - commands


def test_chart_and_dockerfile_only_set_real_settings() -> None:
    import re
    from dataclasses import fields

    from service.settings import Settings

    known = {"CLIP_" + f.name.upper() for f in fields(Settings)}
    sources = [REPO_ROOT / "Dockerfile", *sorted((REPO_ROOT / "helm").rglob("*.yaml"))]
    used = {
        name for path in sources for name in re.findall(r"\bCLIP_[A-Z0-9_]+\b", path.read_text())
    }
    assert used, "no CLIP_* settings found in the deployment files"
    assert used <= known, f"unknown settings: {sorted(used - known)}"
