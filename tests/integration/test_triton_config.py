"""Both config.pbtxt flavors parse as Triton ModelConfig and say what they should."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from service.model.export import export_model
from service.settings import BatchingOptions

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    batching = BatchingOptions(
        max_batch_size=16,
        instances=2,
        max_queue_delay_us=500,
        max_queue_size=64,
        queue_timeout_us=250_000,
    )
    out = {}
    for flavor in ("pytorch", "python"):
        directory = tmp_path_factory.mktemp(flavor)
        export_model(
            "clip-demo-shapes", "none", directory, flavor=flavor, batching=batching, progress=False
        )
        out[flavor] = directory
    return out


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("flavor", ["pytorch", "python"])
def test_configs_parse_and_carry_batching_options(flavor: str, exported: dict[str, Path]) -> None:
    for name in ("clip_image", "clip_text"):
        config = _parse(exported[flavor] / name / "config.pbtxt")
        assert config.name == name
        assert config.max_batch_size == 16
        assert config.instance_group[0].count == 2
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        policy = config.dynamic_batching.default_queue_policy
        assert policy.max_queue_size == 64
        assert policy.default_timeout_microseconds == 250_000
        assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
        # Without it Triton ignores the queue timeout the gateway derives from the caller's
        # deadline for each request and keeps its own.
        assert policy.allow_timeout_override
        assert config.output[0].data_type == model_config_pb2.TYPE_FP32
        assert list(config.output[0].dims) == [64]
        assert (exported[flavor] / name / "1" / "model.pt").is_file()


def test_flavors_differ_where_they_must(exported: dict[str, Path]) -> None:
    gpu = _parse(exported["pytorch"] / "clip_image" / "config.pbtxt")
    cpu = _parse(exported["python"] / "clip_image" / "config.pbtxt")
    assert gpu.platform == "pytorch_libtorch" and gpu.backend == ""
    assert gpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert cpu.backend == "python"
    assert cpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert (exported["python"] / "clip_image" / "1" / "model.py").is_file()
    assert not (exported["pytorch"] / "clip_image" / "1" / "model.py").exists()


def test_tensor_shapes(exported: dict[str, Path]) -> None:
    image = _parse(exported["python"] / "clip_image" / "config.pbtxt")
    text = _parse(exported["python"] / "clip_text" / "config.pbtxt")
    assert image.input[0].data_type == model_config_pb2.TYPE_UINT8
    assert list(image.input[0].dims) == [3, 64, 64]
    assert text.input[0].data_type == model_config_pb2.TYPE_INT64
    assert list(text.input[0].dims) == [-1]  # any token length: padding is cut
    assert text.input[0].allow_ragged_batch  # model.py groups mixed lengths itself
    assert not image.input[0].allow_ragged_batch


def test_libtorch_text_input_is_not_ragged(exported: dict[str, Path]) -> None:
    text = _parse(exported["pytorch"] / "clip_text" / "config.pbtxt")
    assert not text.input[0].allow_ragged_batch  # one dense tensor per execution
