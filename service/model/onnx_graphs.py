"""The encoders as ONNX files (`clipsvc export --flavor onnx`) and ONNX Runtime sessions for them.

The graphs are the same modules the TorchScript flavors script (`encoders.py`): uint8
`[B,3,S,S]` and int64 `[B,L]` in, L2-normalized float32 `[B,D]` out, with B dynamic and,
for text, L dynamic in `[1, context length]` (the positional embedding and causal mask
are cut to L inside the graph).

They are exported with `torch.onnx.export(dynamo=True)` (`torch.export` + onnxscript).
The TorchScript-based exporter (`dynamo=False`) does not work for these towers with torch
2.14: tracing `nn.MultiheadAttention` bakes the example's sequence length and batch into
the graph (`_in_projection_packed` reshapes with Python ints), so other lengths fail in
ONNX Runtime, and exporting the scripted module stops at `prim::is_nested`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the export needs torch; the ONNX Runtime sessions below do not
    import torch

ONNX_FILE = "model.onnx"
# The opset the dynamo exporter of torch 2.14 writes by default; pinned so a torch upgrade
# cannot silently raise what Triton's ONNX Runtime (and TensorRT) must understand.
OPSET = 20
_LOGGER = logging.getLogger(__name__)


class OnnxExportError(RuntimeError):
    """An encoder could not be exported to ONNX (the message says which and why)."""


def export_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    input_name: str,
    output_name: str,
    dynamic_length: int | None = None,
    what: str,
) -> None:
    """Write `module` as ONNX to `path` with a dynamic batch (and length, up to `dynamic_length`).

    Weights go into the file itself unless the model passes ONNX's 2 GB limit; then they
    go to `model.onnx.data` beside it (ONNX Runtime and Triton find it there).
    """
    import torch

    batch = torch.export.Dim("batch", min=1)
    axes: dict[int, torch.export.Dim] = {0: batch}
    if dynamic_length is not None:
        axes[1] = torch.export.Dim("length", min=1, max=dynamic_length)
    # onnxscript's optimizer logs every skipped constant fold as a warning.
    quiet = logging.getLogger("onnxscript")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes=(axes,),
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
        program.save(str(path), external_data=None)
    except Exception as exc:
        raise OnnxExportError(
            f"the {what} cannot be exported to ONNX ({_reason(exc)}); the TorchScript "
            "flavors (--flavor pytorch or --flavor python) use another exporter and may work"
        ) from exc
    finally:
        quiet.setLevel(level)


def open_session(path: Path, *, intra_op_threads: int = 0):  # -> onnxruntime.InferenceSession
    """An ONNX Runtime session on the CPU provider with every graph optimization on, tuned
    for a shared CPU and inputs whose shape changes from call to call.

    `intra_op_threads` 0 keeps ONNX Runtime's default (one per physical core).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    # One model thread calls run(); a second pool for independent branches would only
    # compete with the intra-op threads (these graphs are one chain).
    options.inter_op_num_threads = 1
    # Idle intra-op threads spin by default: on a few shared cores they starve the
    # gateway's decode threads and event loop (OMP_WAIT_POLICY=PASSIVE for torch, same why).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Buffers planned for the previous input's shape help only when every call has the
    # same shape; batch size and text length vary here (texts measured ~1.5x faster off).
    options.enable_mem_pattern = False
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def run_session(session, input_name: str, rows: np.ndarray) -> np.ndarray:
    """`rows` through a one-input, one-output session → float32 `[B,D]`."""
    (out,) = session.run(None, {input_name: rows})
    return np.asarray(out, dtype=np.float32)


def _reason(exc: BaseException) -> str:
    """The root cause's type and first line: torch.onnx wraps it in a page of advice."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else 'no message'}"
