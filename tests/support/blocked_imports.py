"""Run a module as `__main__` as if torch & co. were not installed, and say who asked for them.

    python -m tests.support.blocked_imports [--report FILE] MODULE [ARGS...]

The gateway's base install has no torch, open_clip, transformers (nor the Hugging Face hub
client, which the image leaves out): this makes the shared test venv, which has them all,
behave like that install. Importing one of `BLOCKED` raises ModuleNotFoundError as a
missing package would; every attempt is recorded (with the importing file and line), also
the ones a caller catches, and written as JSON to FILE at exit:
`{"attempts": [...], "loaded": [...]}` (`loaded`: blocked names in `sys.modules`).
"""

from __future__ import annotations

import atexit
import importlib.abc
import json
import runpy
import sys
import traceback
from pathlib import Path

#: What the gateway must run without (pyproject's extras, and the hub client the image drops).
BLOCKED = frozenset(
    {
        "torch",
        "torchvision",
        "open_clip",
        "transformers",
        "timm",
        "onnx",
        "onnxscript",
        "sentencepiece",
        "huggingface_hub",
        "hf_xet",
    }
)


class _Blocker(importlib.abc.MetaPathFinder):
    """Refuses `BLOCKED` packages and records who asked."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname.partition(".")[0] not in BLOCKED:
            return None
        caller = next(
            (
                f"{frame.filename}:{frame.lineno}"
                for frame in reversed(traceback.extract_stack()[:-1])
                if "importlib" not in frame.filename and frame.filename != __file__
            ),
            "?",
        )
        self.attempts.append(f"{fullname} (from {caller})")
        raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)", name=fullname)


def main(argv: list[str]) -> None:
    """Install the blocker, then run `argv[0]` as `__main__` with the rest as its arguments."""
    report: Path | None = None
    if argv[:1] == ["--report"]:
        report, argv = Path(argv[1]), argv[2:]
    blocker = _Blocker()
    sys.meta_path.insert(0, blocker)

    def write_report() -> None:
        if report is not None:
            loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
            report.write_text(json.dumps({"attempts": blocker.attempts, "loaded": loaded}))

    atexit.register(write_report)
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
