"""`metadata.json` beside the exported encoders: all a gateway needs to serve them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

METADATA_FILE = "metadata.json"
IMAGE_MODEL = "clip_image"
TEXT_MODEL = "clip_text"
# Triton's libtorch backend wants `<name>__<index>`; the python flavor uses the same names.
IMAGE_INPUT = "PIXELS__0"
TEXT_INPUT = "TOKENS__0"
OUTPUT = "EMBEDDINGS__0"
# `parameters` of both `config.pbtxt` files: which export Triton serves (the gateway
# compares them with its own metadata.json before it serves a vector).
MODEL_ID_PARAMETER = "clip_model_id"
WEIGHTS_PARAMETER = "clip_weights_sha256"


@dataclass(frozen=True)
class ModelMetadata:
    """Describes one exported CLIP: identity, preprocessing, tokenizer and scale."""

    model_name: str
    pretrained: str
    weights_sha256: str
    embedding_dim: int
    image_size: int
    context_length: int
    logit_scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    tokenizer: str = "clip-bpe"
    logit_bias: float | None = None
    variable_length_text: bool = True
    image_model: str = IMAGE_MODEL
    text_model: str = TEXT_MODEL
    image_input: str = IMAGE_INPUT
    text_input: str = TEXT_INPUT
    output: str = OUTPUT
    #: How the encoders were exported (`clipsvc export --flavor`): "pytorch" or "python"
    #: (TorchScript `model.pt`), "onnx" (`model.onnx`); "" in repositories exported before
    #: this field existed, which are TorchScript.
    flavor: str = ""
    #: What the towers compute in: "fp32", "fp16" (`clipsvc export --precision`), or
    #: "trt-fp16" (onnx `--tensorrt`: TensorRT runs them in fp16 on Triton's GPUs).
    precision: str = "fp32"
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        """Short identity used in responses and cache keys; changes when the weights do
        (and with their precision: fp16 vectors never share cache entries with fp32 ones)."""
        suffix = "" if self.precision == "fp32" else f"+{self.precision}"
        return f"{self.model_name}/{self.pretrained}@{self.weights_sha256[:12]}{suffix}"

    def triton_parameters(self) -> dict[str, str]:
        """The identity stamped into each `config.pbtxt` as Triton `parameters`."""
        return {MODEL_ID_PARAMETER: self.model_id, WEIGHTS_PARAMETER: self.weights_sha256}

    @property
    def is_onnx(self) -> bool:
        """The encoders are `model.onnx` files (run by ONNX Runtime), not TorchScript."""
        return self.flavor == "onnx"

    def save(self, directory: Path) -> Path:
        """Write `metadata.json` into `directory`."""
        path = Path(directory) / METADATA_FILE
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> ModelMetadata:
        """Read `metadata.json` from an exported model repository."""
        path = Path(directory) / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: export a model first "
                "(`make model` or `clipsvc export --out DIR`)"
            )
        raw = json.loads(path.read_text())
        raw["mean"] = tuple(raw["mean"])
        raw["std"] = tuple(raw["std"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})
