"""The onnx flavor's config.pbtxt (plain and --tensorrt), its flags, and how serve picks it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from service.cli import build_parser
from service.metrics import Metrics
from service.model.metadata import IMAGE_INPUT, OUTPUT, TEXT_INPUT, ModelMetadata
from service.model.triton_config import TensorSpec, render_config
from service.settings import BatchingOptions, ExportSettings, Settings, SettingsError
from tests.support.fakes import DEMO_METADATA_FIELDS

BATCHING = BatchingOptions(
    max_batch_size=16, instances=2, max_queue_delay_us=500, max_queue_size=64
)
TENSORRT_BLOCK = """optimization { execution_accelerators {
  gpu_execution_accelerator : [ {
    name : "tensorrt"
    parameters { key: "precision_mode" value: "FP16" }
  } ]
} }
"""


def _render(name: str = "clip_text", **kwargs: object) -> str:
    inputs = (
        [TensorSpec(TEXT_INPUT, "TYPE_INT64", (-1,), ragged=True)]
        if name == "clip_text"
        else [TensorSpec(IMAGE_INPUT, "TYPE_UINT8", (3, 224, 224))]
    )
    options = {"flavor": "onnx", "batching": BATCHING, **kwargs}
    return render_config(
        name=name,
        inputs=inputs,
        outputs=[TensorSpec(OUTPUT, "TYPE_FP32", (512,))],
        **options,  # type: ignore[arg-type]
    )


def _parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("name", ["clip_image", "clip_text"])
def test_onnx_config_is_onnxruntime_with_dynamic_batching(name: str) -> None:
    text = _render(name)
    config = _parse(text)
    assert 'platform: "onnxruntime_onnx"' in text
    assert config.platform == "onnxruntime_onnx"
    assert not config.backend
    assert config.max_batch_size == 16
    assert config.instance_group[0].count == 2
    # No GPU asked for: NVIDIA's image puts it on a GPU where there is one, else the CPU.
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64
    # ONNX Runtime takes one dense tensor: different lengths must not be merged.
    assert not config.input[0].allow_ragged_batch
    assert config.output[0].name == OUTPUT
    assert list(config.output[0].dims) == [512]
    assert not config.HasField("optimization")
    assert "tensorrt" not in text
    assert not config.parameters  # 0 threads: ONNX Runtime's default


def test_onnx_config_carries_the_thread_count_when_set() -> None:
    config = _parse(_render(batching=BATCHING.replace(torch_threads=3)))
    assert config.parameters["intra_op_thread_count"].string_value == "3"


def test_tensorrt_adds_the_fp16_accelerator_on_a_gpu_instance() -> None:
    text = _render(tensorrt=True)
    assert TENSORRT_BLOCK in text
    config = _parse(text)
    assert config.platform == "onnxruntime_onnx"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {"precision_mode": "FP16"}
    assert not config.optimization.execution_accelerators.cpu_execution_accelerator


@pytest.mark.parametrize("flavor", ["pytorch", "python"])
def test_tensorrt_is_refused_for_torchscript_flavors(flavor: str) -> None:
    with pytest.raises(ValueError, match="onnx"):
        _render(flavor=flavor, tensorrt=True)
    with pytest.raises(SettingsError, match="--flavor onnx"):
        ExportSettings(model="m", out=Path("o"), flavor=flavor, tensorrt=True)


def test_export_flags_parse_flavor_onnx_and_tensorrt() -> None:
    args = build_parser().parse_args(
        ["export", "--model", "ViT-B-32", "--out", "repo", "--flavor", "onnx", "--tensorrt"]
    )
    export = ExportSettings.from_sources(args, environ={})
    assert (export.flavor, export.tensorrt) == ("onnx", True)
    args = build_parser().parse_args(["export", "--model", "m", "--out", "o", "--flavor", "onnx"])
    assert ExportSettings.from_sources(args, environ={}).tensorrt is False


def _metadata(**changes: object) -> dict[str, object]:
    """A metadata.json's content: the fields an export has always written, and `changes`."""
    return DEMO_METADATA_FIELDS | changes


def test_repositories_exported_before_the_flavor_field_still_load(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text(json.dumps(_metadata()))
    old = ModelMetadata.load(tmp_path)
    assert old.flavor == ""
    assert not old.is_onnx
    (tmp_path / "metadata.json").write_text(json.dumps(_metadata(flavor="onnx")))
    assert ModelMetadata.load(tmp_path).is_onnx


@pytest.mark.parametrize(
    ("flavor", "backend_name"),
    [("onnx", "embedded-onnx"), ("python", "embedded"), ("pytorch", "embedded"), ("", "embedded")],
)
def test_embedded_serve_picks_the_runtime_from_the_repository(
    flavor: str, backend_name: str, tmp_path: Path
) -> None:
    from service.wiring import build_embedder

    (tmp_path / "metadata.json").write_text(json.dumps(_metadata(flavor=flavor)))
    settings = Settings(model_repository=tmp_path, backend="embedded")
    embedder = build_embedder(settings, Metrics())  # built, not started: no model files read
    assert embedder.backend_name == backend_name


def test_onnx_flavor_in_process_refuses_a_gpu_device(tmp_path: Path) -> None:
    from service.wiring import build_embedder

    (tmp_path / "metadata.json").write_text(json.dumps(_metadata(flavor="onnx")))
    with pytest.raises(ValueError, match="CPU"):
        build_embedder(Settings(model_repository=tmp_path, device="cuda"), Metrics())
