"""`python -m bench.run_all --quick` runs every scenario and writes its tables (issue 30).

A smoke test of the benchmarks, not of their figures: every scenario starts its real
servers (gateways, tritonserver, redis-server), measures tiny points on the demo model
and writes its report, and every table of each report has at least one row. Nothing is
asserted about a number (speed claims live in bench/results/, measured, never in tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

#: Each report of the quick run and the sections (or table headers) it must hold.
REPORTS = {
    "throughput-clip-demo-shapes.md": [
        "## Points",
        "## Baselines",
        "## Paired rounds",
        "## Ratios",
    ],
    "cache.md": ["## Points", "## Ratios against no cache"],
    "load.md": ["| RPC | calls |", "Resident memory (MB)"],
    "http-vs-grpc.md": ["## Medians", "## Every point"],
    "replicas.md": ["## Summary", "## Rounds"],
    "replicas-drain.md": ["## Summary", "## Cycles"],
    "replicas-foreign.md": ["## Result"],
    "onnx.md": ["## Ratios", "## Items per second"],
    "soak-hostile.md": [
        "## Targets",
        "## Well-behaved callers",
        "## Hostile callers",
        "## Over time",
    ],
    "soak-faults.md": ["## Targets", "## Well-behaved callers", "## Faults"],
    "profile-images-clip-demo-shapes.md": ["## CPU by gateway thread", "## Stage means"],
    "families.md": ["| family | pass / tried |", "| model | family | status |"],
    "gpu-smoke.md": ["## Results", "## Steps (from gpu.sh)"],
    "gateway-cpu.md": ["## 1. Gateway CPU", "## 2. Gateway cores", "## 3.", "## 4."],
    "quantization.md": ["## demo-images", "## vit-b-32-texts"],
    "lanes.md": ["| code | idle p50 ms |"],
    "tracing.md": ["| measure | tracing off |"],
    "catalog.md": ["| dim | index |", "| query | p50 ms |"],
}


def table_after(text: str, marker: str) -> list[str]:
    """The rows of the first Markdown table at or after `marker` (header and rule left out)."""
    lines = text[text.index(marker) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows[2:]


def test_table_after_reads_the_rows_of_the_next_table() -> None:
    text = "# t\n\n## A\n\nprose\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n## B\n"
    assert table_after(text, "## A") == ["| 1 | 2 |"]
    assert table_after(text, "| a | b |") == ["| 1 | 2 |"]
    with pytest.raises(StopIteration):
        table_after("## A\n\nno table\n", "## A")


def test_run_all_quick_writes_every_scenarios_tables(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "bench.run_all", "--quick", "--results-dir", str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=1700,
        check=False,
    )
    summary = run.stdout[run.stdout.rfind("=== run_all: summary ===") :]
    assert run.returncode == 0, summary + run.stderr[-3000:]
    for name, markers in REPORTS.items():
        text = (out / name).read_text()
        for marker in markers:
            assert marker in text, f"{name}: no {marker!r}"
            assert table_after(text, marker), f"{name}: the table at {marker!r} has no row"
