"""The onnx flavor for real: exported from open_clip, run by ONNX Runtime, served over gRPC.

Parity with open_clip within 1e-5 for real photos (several sizes and modes) and for texts
of every token length, 1 to 77 and truncated, on the demo CLIP and a random-weight
ViT-B-32; the gateway in-process (`running_gateway`, free ports) with calls over real gRPC.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from service.cli import main as clipsvc
from service.client import AsyncClipClient
from service.model.export import export_model, load_open_clip, weights_sha256
from service.model.metadata import ModelMetadata
from service.model.onnx_graphs import OnnxExportError, open_session, run_session
from service.processes.gateway import gateway_settings, running_gateway
from tests.support.helm import ensure_helm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-5
REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_WEIGHTS = REPO_ROOT / "demo" / "clip-demo-shapes.pt"
# Each is one BPE token, so n words make a text of exactly n + 2 tokens.
WORDS = ("cat", "dog", "red", "blue", "a", "photo", "of", "the", "big", "small")
# 0..75 words: every length from 2 tokens (start + end of text) to the full 77; then one
# that is cut at 77 and flagged truncated.
TEXTS = [" ".join(WORDS[i % len(WORDS)] for i in range(n)) for n in range(76)]
TEXTS.append("word " * 200)


@dataclass(frozen=True)
class OnnxModel:
    """An open_clip model in memory and its onnx-flavor repository."""

    name: str
    clip: torch.nn.Module
    repository: Path


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    """The demo CLIP exported as `clipsvc export --model clip-demo-shapes --flavor onnx` does."""
    out = tmp_path_factory.mktemp("demo-onnx")
    export_model("clip-demo-shapes", str(DEMO_WEIGHTS), out, flavor="onnx", progress=False)
    clip, _ = load_open_clip("clip-demo-shapes", str(DEMO_WEIGHTS))
    return OnnxModel("clip-demo-shapes", clip, out)


@pytest.fixture(scope="module")
def vit_onnx(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    """A random-weight ViT-B-32 (`--pretrained none` after a fixed seed) as the onnx flavor."""
    out = tmp_path_factory.mktemp("vit-onnx")
    torch.manual_seed(1234)
    export_model("ViT-B-32", "none", out, flavor="onnx", progress=False)
    torch.manual_seed(1234)
    clip, _ = load_open_clip("ViT-B-32", "none")
    # The same seed gave the same weights, or nothing below compares like with like.
    assert weights_sha256(clip) == ModelMetadata.load(out).weights_sha256
    return OnnxModel("ViT-B-32", clip, out)


@pytest.fixture(params=["demo_onnx", "vit_onnx"])
def model(request: pytest.FixtureRequest) -> OnnxModel:
    return request.getfixturevalue(request.param)


@contextlib.asynccontextmanager
async def serving(repository: Path, **settings: object) -> AsyncIterator[AsyncClipClient]:
    """A real gateway on free loopback ports, SERVING, and a client connected to it."""
    async with (
        running_gateway(gateway_settings(repository, **settings)) as gateway,
        AsyncClipClient(f"127.0.0.1:{gateway.port}", timeout_s=120) as client,
    ):
        yield client


def _photos() -> dict[str, Image.Image]:
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())
    photos = {
        "astronaut": astronaut,
        "chelsea": Image.fromarray(data.chelsea()),
        "coffee": Image.fromarray(data.coffee()),
        "rocket": Image.fromarray(data.rocket()),
        "camera": Image.fromarray(data.camera()),  # grayscale
    }
    for mode in ("L", "LA", "RGBA", "P", "1", "I;16"):
        photos[f"mode-{mode}"] = astronaut.convert(mode)
    for width, height in ((1, 1), (3, 700), (641, 479), (64, 64), (1800, 1200)):
        photos[f"{width}x{height}"] = astronaut.resize((width, height))
    return photos


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _reference_images(model: OnnxModel, blobs: list[bytes]) -> np.ndarray:
    """open_clip's own preprocess + encode_image on the same encoded bytes."""
    _, _, preprocess = open_clip.create_model_and_transforms(model.name, pretrained=None)
    batch = torch.stack([preprocess(Image.open(io.BytesIO(blob))) for blob in blobs])
    with torch.no_grad():
        return model.clip.encode_image(batch, normalize=True).numpy()


def _reference_texts(model: OnnxModel, texts: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    tokens = open_clip.get_tokenizer(model.name)(texts)
    with torch.no_grad():
        return tokens, model.clip.encode_text(tokens, normalize=True).numpy()


def _worst(want: np.ndarray, got: np.ndarray, names: list[str]) -> dict[str, float]:
    assert got.shape == want.shape, (got.shape, want.shape)
    return {name: float(np.abs(w - g).max()) for name, w, g in zip(names, want, got, strict=True)}


async def test_served_images_match_open_clip(model: OnnxModel) -> None:
    photos = _photos()
    names = [*photos, "astronaut.jpg"]
    blobs = [_encode(image, "PNG") for image in photos.values()]
    blobs.append(_encode(photos["astronaut"], "JPEG"))
    async with serving(model.repository) as client:
        got = (await client.embed_image(blobs)).vectors
        one = (await client.embed_image(blobs[:1])).vectors  # a batch of one
    worst = _worst(_reference_images(model, blobs), got, names)
    assert max(worst.values()) <= TOL, worst
    assert np.abs(one[0] - got[0]).max() <= TOL


async def test_served_texts_of_every_length_match_open_clip(model: OnnxModel) -> None:
    tokens, want = _reference_texts(model, TEXTS)
    lengths = [int(n) for n in (tokens != 0).sum(dim=1)]
    assert lengths == [*range(2, 78), 77], "each word must be one token"
    async with serving(model.repository) as client:
        answer = await client.embed_text(TEXTS)
        alone = [(await client.embed_text([text])).vectors[0] for text in TEXTS[:3]]
    worst = _worst(want, answer.vectors, [f"{n} tokens" for n in lengths])
    assert max(worst.values()) <= TOL, worst
    assert answer.truncated == [False] * 76 + [True]
    assert max(float(np.abs(w - a).max()) for w, a in zip(want, alone, strict=False)) <= TOL


def test_text_graph_takes_every_length_from_1_to_77(model: OnnxModel) -> None:
    """The file itself, cut exactly at each length (the gateway pads to buckets)."""
    tokens, want = _reference_texts(model, TEXTS)
    session = open_session(model.repository / "clip_text" / "1" / "model.onnx")
    worst: dict[str, float] = {}
    for row, length in enumerate((tokens != 0).sum(dim=1).tolist()):
        got = run_session(session, "TOKENS__0", tokens[row : row + 1, :length].numpy())
        worst[f"L={length} (text {row})"] = float(np.abs(want[row] - got[0]).max())
    # L = 1: the start token alone; open_clip pools it too (argmax of [start, 0, 0, ...]).
    start_only = torch.zeros(1, tokens.shape[1], dtype=torch.long)
    start_only[0, 0] = tokens[0, 0]
    with torch.no_grad():
        want_start = model.clip.encode_text(start_only, normalize=True).numpy()
    got_start = run_session(session, "TOKENS__0", start_only[:, :1].numpy())
    worst["L=1"] = float(np.abs(want_start - got_start).max())
    assert max(worst.values()) <= TOL, worst
    got_all = run_session(session, "TOKENS__0", tokens.numpy())  # a batch of 77, full length
    assert float(np.abs(want - got_all).max()) <= TOL


def test_repository_has_onnx_files_and_onnxruntime_configs(demo_onnx: OnnxModel) -> None:
    repo = demo_onnx.repository
    meta = ModelMetadata.load(repo)
    assert meta.flavor == "onnx"
    assert "onnxruntime" in meta.versions
    for name, input_name, dtype, dims in (
        ("clip_image", "PIXELS__0", model_config_pb2.TYPE_UINT8, [3, 64, 64]),
        ("clip_text", "TOKENS__0", model_config_pb2.TYPE_INT64, [-1]),
    ):
        assert sorted(p.name for p in (repo / name / "1").iterdir()) == ["model.onnx"]
        config = text_format.Parse(
            (repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        assert config.platform == "onnxruntime_onnx"
        assert (config.input[0].name, config.input[0].data_type) == (input_name, dtype)
        assert list(config.input[0].dims) == dims
        assert list(config.output[0].dims) == [meta.embedding_dim]
        assert config.HasField("dynamic_batching")
        session = open_session(repo / name / "1" / "model.onnx")
        (graph_input,) = session.get_inputs()
        (graph_output,) = session.get_outputs()
        assert graph_input.name == input_name
        assert graph_output.name == "EMBEDDINGS__0"
        assert graph_output.type == "tensor(float)"
        # Batch (and text length) are named dynamic dimensions, not numbers.
        assert isinstance(graph_input.shape[0], str)
        assert isinstance(graph_input.shape[1], str) == (name == "clip_text")


async def test_demo_model_info_and_zero_shot_through_onnx(demo_onnx: OnnxModel) -> None:
    from service.demo.shapes import LABELS, TEMPLATES, TRAIN_PAIRS, make_eval_set

    images, truth = make_eval_set(987_654, 2, TRAIN_PAIRS)
    blobs = [_encode(image, "PNG") for image in images]
    async with serving(demo_onnx.repository) as client:
        info = await client.model_info()
        ranked = await client.classify(blobs, list(LABELS), templates=list(TEMPLATES), top_k=1)
    assert info.backend == "embedded-onnx"
    assert info.model_id == ModelMetadata.load(demo_onnx.repository).model_id
    accuracy = np.mean([r[0].label == LABELS[t] for r, t in zip(ranked, truth, strict=True)])
    assert accuracy >= 0.9, accuracy


async def test_pip_tritonserver_serves_the_onnx_flavor(demo_onnx: OnnxModel) -> None:
    """`clipsvc triton` has no onnxruntime backend; its python-based stand-in runs model.onnx."""
    from tritonclient.grpc import InferenceServerClient

    from service.processes.triton_server import TritonProcess

    texts = TEXTS[:6] + TEXTS[-1:]
    _, want_texts = _reference_texts(demo_onnx, texts)
    photos = _photos()
    blobs = [_encode(photos[name], "PNG") for name in ("astronaut", "camera", "3x700")]
    with TritonProcess(demo_onnx.repository) as triton:
        config = InferenceServerClient(triton.grpc_url).get_model_config("clip_text").config
        assert (config.platform, config.backend) == ("onnxruntime_onnx", "onnxruntime")
        async with serving(
            demo_onnx.repository, backend="triton", triton_url=triton.grpc_url
        ) as client:
            info = await client.model_info()
            got_texts = (await client.embed_text(texts)).vectors
            got_images = (await client.embed_image(blobs)).vectors
    assert info.backend == "triton"
    assert float(np.abs(want_texts - got_texts).max()) <= TOL
    assert float(np.abs(_reference_images(demo_onnx, blobs) - got_images).max()) <= TOL


def test_flavor_change_replaces_the_model_files_and_tensorrt_config(tmp_path: Path) -> None:
    """python → onnx --tensorrt (through the CLI) in one folder: no stale model.pt is left."""
    export_model("clip-demo-shapes", str(DEMO_WEIGHTS), tmp_path, progress=False)
    assert (tmp_path / "clip_text" / "1" / "model.pt").is_file()
    argv = ["export", "--model", "clip-demo-shapes", "--pretrained", str(DEMO_WEIGHTS)]
    assert clipsvc([*argv, "--out", str(tmp_path), "--flavor", "onnx", "--tensorrt"]) == 0
    for name in ("clip_image", "clip_text"):
        assert sorted(p.name for p in (tmp_path / name / "1").iterdir()) == ["model.onnx"]
        config = text_format.Parse(
            (tmp_path / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        assert config.platform == "onnxruntime_onnx"
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert (accelerator.name, dict(accelerator.parameters)) == (
            "tensorrt",
            {"precision_mode": "FP16"},
        )
    metadata = ModelMetadata.load(tmp_path)
    assert metadata.flavor == "onnx"
    # fp16 vectors from TensorRT never share cache entries with fp32 ones of these weights.
    assert metadata.model_id.endswith("+trt-fp16"), metadata.model_id


def test_a_model_that_cannot_export_says_so_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        # What torch.onnx raises: a page of advice in colour around the real reason.
        cause = AttributeError("'tuple' object has no attribute 'norm'\nlong trace")
        raise RuntimeError("Failed to export. \x1b[96mThis is step 1/3\x1b[0m ...") from cause

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(OnnxExportError) as caught:
        export_model("clip-demo-shapes", str(DEMO_WEIGHTS), tmp_path, flavor="onnx")
    message = str(caught.value)
    assert "image tower of CLIP cannot be exported to ONNX" in message
    assert "AttributeError: 'tuple' object has no attribute 'norm'" in message
    assert "long trace" not in message and "\x1b" not in message
    assert "--flavor pytorch" in message
    assert not any(tmp_path.iterdir())


def _model_config_script(*values: str) -> list[str]:
    import subprocess

    import yaml

    sets = [arg for value in values for arg in ("--set", value)]
    done = subprocess.run(
        [ensure_helm(), "template", "clip", str(REPO_ROOT / "helm" / "clip-service"), *sets],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for doc in yaml.safe_load_all(done.stdout):
        if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"].endswith("triton"):
            for init in doc["spec"]["template"]["spec"].get("initContainers", []):
                if init["name"] == "model-config":
                    return init["command"]
    raise AssertionError("no model-config init container rendered")


@pytest.mark.parametrize("flavor", ["onnx", "pytorch"])
def test_chart_cpu_triton_drops_tensorrt_from_onnx_configs(flavor: str, tmp_path: Path) -> None:
    """`triton.modelFlavor=onnx` + `gpu.enabled=false`: KIND_CPU and no GPU-only TensorRT."""
    import subprocess

    from service.model.triton_config import TensorSpec, render_config
    from service.settings import BatchingOptions

    source, served = tmp_path / "models", tmp_path / "served"
    for name in ("clip_image", "clip_text"):
        (source / name / "1").mkdir(parents=True)
        (source / name / "1" / "model.onnx").write_bytes(b"onnx")
        (source / name / "config.pbtxt").write_text(
            render_config(
                name=name,
                flavor="onnx",
                inputs=[TensorSpec("TOKENS__0", "TYPE_INT64", (-1,))],
                outputs=[TensorSpec("EMBEDDINGS__0", "TYPE_FP32", (64,))],
                batching=BatchingOptions(),
                tensorrt=True,
            )
        )
    served.mkdir()
    script = _model_config_script("triton.gpu.enabled=false", f"triton.modelFlavor={flavor}")
    env = {"PATH": os.environ["PATH"], "MODEL_REPOSITORY": str(source)}
    done = subprocess.run(
        script,
        env={**env, "SERVED_REPOSITORY": str(served)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for name in ("clip_image", "clip_text"):
        text = (served / name / "config.pbtxt").read_text()
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert config.platform == "onnxruntime_onnx"
        # Only the onnx value strips the accelerator (pytorch configs never have one).
        assert config.HasField("optimization") == (flavor == "pytorch")
        assert (served / name / "1" / "model.onnx").is_symlink()


def test_chart_schema_knows_the_flavors() -> None:
    import subprocess

    done = subprocess.run(
        [
            ensure_helm(),
            "template",
            "clip",
            str(REPO_ROOT / "helm" / "clip-service"),
            "--set",
            "triton.modelFlavor=tensorflow",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "modelFlavor" in done.stderr
