"""Renders Triton `config.pbtxt` for the two encoders, in any flavor.

`pytorch`: `platform: "pytorch_libtorch"`, KIND_GPU, for NVIDIA's Triton image.
`python`: the python backend (`model.py` loads the same `model.pt`), KIND_CPU, for the
`tritonserver` binary of the pip wheel, which ships only that backend.
`onnx`: `platform: "onnxruntime_onnx"` (`model.onnx`) for NVIDIA's Triton image, KIND_AUTO
(a GPU where the server has one, else the CPU); `tensorrt=True` adds TensorRT in fp16 as
the GPU execution accelerator and asks for KIND_GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from service.settings import BatchingOptions

FLAVORS = ("pytorch", "python", "onnx")
_PLATFORMS = {"pytorch": "pytorch_libtorch", "onnx": "onnxruntime_onnx"}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor (batch dimension left out, as Triton wants)."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    #: Variable-length input (token ids): may the dynamic batcher merge different lengths?
    ragged: bool = False


def render_config(
    *,
    name: str,
    flavor: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    batching: BatchingOptions,
    parameters: Mapping[str, str] | None = None,
    tensorrt: bool = False,
) -> str:
    """The text of one `config.pbtxt`; `parameters` are added as string parameters
    (the export stamps the model's identity this way, see `ModelMetadata.triton_parameters`).
    """
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}, not {flavor!r}")
    if tensorrt and flavor != "onnx":
        raise ValueError(f"TensorRT needs the onnx flavor, not {flavor!r}")
    lines = [f'name: "{name}"']
    if flavor in _PLATFORMS:
        lines.append(f'platform: "{_PLATFORMS[flavor]}"')
    else:
        lines.append('backend: "python"')
    lines.append(f"max_batch_size: {batching.max_batch_size}")
    # Only the python flavor's model.py takes mixed lengths in one execute() (it groups
    # them by shape); libtorch needs one dense tensor, so there lengths batch separately.
    ragged = flavor == "python"
    lines += _tensors("input", inputs, ragged) + _tensors("output", outputs, False)
    kind = {"pytorch": "KIND_GPU", "python": "KIND_CPU", "onnx": "KIND_AUTO"}[flavor]
    if tensorrt:
        kind = "KIND_GPU"  # TensorRT runs only on a GPU instance
    lines += [
        "instance_group [",
        f"  {{ count: {batching.instances} kind: {kind} }}",
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}",
        # The gateway's lanes (service/core/lanes.py): 1 = interactive, served first; 2 =
        # bulk. Requests that name no level (other clients) count as interactive.
        "  priority_levels: 2",
        "  default_priority_level: 1",
        "  default_queue_policy {",
        "    timeout_action: REJECT",
        f"    default_timeout_microseconds: {batching.queue_timeout_us}",
        "    allow_timeout_override: true",
        f"    max_queue_size: {batching.max_queue_size}",
        "  }",
        "}",
    ]
    if tensorrt:
        # Triton's onnxruntime backend compiles TensorRT engines for the graph at load
        # (minutes) and again for input shapes it has not seen.
        lines += [
            "optimization { execution_accelerators {",
            "  gpu_execution_accelerator : [ {",
            '    name : "tensorrt"',
            '    parameters { key: "precision_mode" value: "FP16" }',
            "  } ]",
            "} }",
        ]
    params: dict[str, str]
    if flavor == "python":
        params = {"TORCH_THREADS": str(batching.torch_threads)}
    elif flavor == "onnx":
        # The onnxruntime backend's own parameter; left out, ONNX Runtime picks.
        params = (
            {"intra_op_thread_count": str(batching.torch_threads)}
            if batching.torch_threads > 0
            else {}
        )
    else:
        params = {"INFERENCE_MODE": "true", "DISABLE_CUDNN": "false"}
    params.update(parameters or {})
    for key, value in params.items():
        lines.append(
            f"parameters: {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}"
        )
    return "\n".join(lines) + "\n"


def _tensors(kind: str, specs: list[TensorSpec], ragged: bool) -> list[str]:
    out = [f"{kind} ["]
    for i, spec in enumerate(specs):
        dims = ", ".join(str(d) for d in spec.dims)
        sep = "," if i < len(specs) - 1 else ""
        extra = " allow_ragged_batch: true" if ragged and spec.ragged else ""
        out.append(
            f'  {{ name: "{spec.name}" data_type: {spec.data_type} dims: [ {dims} ]{extra} }}{sep}'
        )
    out.append("]")
    return out


def _quote(text: str) -> str:
    """A protobuf text-format string literal (a checkpoint's file name may hold anything)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
