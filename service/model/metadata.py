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
    #: "clip-bpe" (open_clip's SimpleTokenizer, built into the gateway) or "hf" (the
    #: `tokenizers` file at `tokenizer_file`, copied into the repository by the export).
    tokenizer: str = "clip-bpe"
    #: Present only in models trained with one (SigLIP): sigmoid(scale × cos + bias) scores.
    logit_bias: float | None = None
    #: "trim": the text graph takes any length ≤ context (causal towers pooling at
    #: end-of-text; the gateway cuts padding to buckets). "full": it takes exactly the
    #: context length, padded as open_clip pads (fixed-position pooling, masked towers).
    text_padding: str = "trim"
    #: HF tokenizers: `tokenizer.json` relative to the repository.
    tokenizer_file: str = ""
    #: HF tokenizers: open_clip's clean function applied first ("whitespace",
    #: "canonicalize", "lower"); the CLIP BPE has its own.
    tokenizer_clean: str = "whitespace"
    #: HF tokenizers: the id padding is filled with.
    pad_token_id: int = 0
    #: HF tokenizers with open_clip's `strip_sep_token`: this id becomes 0 (BERT's [SEP]).
    strip_sep_token_id: int | None = None
    #: HF tokenizers: the special tokens by role ("bos", "eos", "pad", "sep", "cls", "unk").
    special_tokens: dict[str, int] = field(default_factory=dict)
    #: Towers that take a language (NLLB): the tokenizer's language when a request names
    #: none; None for towers that take no language (a request naming one is refused).
    language: str | None = None
    #: Languages a request may name (the tokenizer's language codes); empty: none.
    languages: tuple[str, ...] = ()
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
    #: Weights of the exported towers: "fp32", or "fp16" (`clipsvc export --precision`).
    precision: str = "fp32"
    versions: dict[str, str] = field(default_factory=dict)
    #: Where `load` read this from (not saved): tokenizer files are found relative to it.
    repository: str = field(default="", compare=False)

    @property
    def score_function(self) -> str:
        """ "sigmoid" for models with a logit bias (SigLIP), else "softmax" (CLIP)."""
        return "softmax" if self.logit_bias is None else "sigmoid"

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
        raw = asdict(self)
        del raw["repository"]
        path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
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
        raw["languages"] = tuple(raw.get("languages", ()))
        raw["repository"] = str(Path(directory))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})
