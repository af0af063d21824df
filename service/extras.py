"""The optional parts of the install, and the error that names the one a caller lacks.

The base install is the gateway (Triton backend, in-process ONNX Runtime): it never imports
torch, open_clip or transformers. What needs them says so on first use, naming the extra:

- `export`: `clipsvc export` (open_clip, torch, torchvision, transformers, onnx, ...)
- `torchscript`: the in-process TorchScript backend (a repository of `model.pt` files)
"""

from __future__ import annotations


class MissingExtra(ImportError):
    """A feature needs a package of an optional extra that is not installed."""

    def __init__(self, extra: str, feature: str, missing: str | None) -> None:
        self.extra = extra
        super().__init__(
            f"{feature} needs {missing or 'a package'}, which the gateway install leaves out: "
            f"pip install 'clip-service[{extra}]'"
        )
