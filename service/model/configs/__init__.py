"""open_clip model configs shipped with the service (the demo model), registered on demand."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
_registered = False


def register() -> None:
    """Make open_clip's `create_model` know the configs in this folder (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    _registered = True
