"""Where the repository and its committed files are."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_WEIGHTS = REPO_ROOT / "demo" / "clip-demo-shapes.pt"
