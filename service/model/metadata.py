"""`metadata.json` beside the exported encoders: all a gateway needs to serve them.

**Several models in one repository.** Each export has a name (`clipsvc export --name`,
default `clip`); its towers are the Triton models `NAME_image` and `NAME_text`, and its
metadata is a file at the repository's root:

    model_repository/
      metadata.json            the model named `clip` (the only file before names existed)
      metadata.NAME.json       every other model, one file each
      clip_image/ clip_text/   NAME_image/ NAME_text/   (Triton model folders)
      NAME_text/tokenizer/     a HF tokenizer's files (Triton loads only numbered folders)

A repository exported before names existed is a repository holding one model, `clip`.
Triton ignores files at the root, so the layout stays a valid Triton repository.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

METADATA_FILE = "metadata.json"
#: The name of an export that was given none, and of a repository exported before names.
DEFAULT_NAME = "clip"
IMAGE_MODEL = "clip_image"
TEXT_MODEL = "clip_text"
# Names go into Triton model names, file names, metric labels and URLs: kept plain.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
# Triton's libtorch backend wants `<name>__<index>`; the python flavor uses the same names.
IMAGE_INPUT = "PIXELS__0"
TEXT_INPUT = "TOKENS__0"
OUTPUT = "EMBEDDINGS__0"
# `parameters` of both `config.pbtxt` files: which export Triton serves (the gateway
# compares them with its own metadata.json before it serves a vector).
MODEL_ID_PARAMETER = "clip_model_id"
WEIGHTS_PARAMETER = "clip_weights_sha256"


def check_name(name: str) -> str:
    """`name` if it may name a model (letters, digits, `_`, `-`; 63 at most), else ValueError."""
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"bad model name {name!r}: use letters, digits, '_' and '-' (63 at most), "
            "starting with a letter or digit"
        )
    return name


def metadata_path(repository: Path, name: str = DEFAULT_NAME) -> Path:
    """Where the metadata of model `name` lives in `repository`."""
    check_name(name)
    file = METADATA_FILE if name == DEFAULT_NAME else f"metadata.{name}.json"
    return Path(repository) / file


def tower_models(name: str) -> tuple[str, str]:
    """The Triton model names of `name`'s image and text towers."""
    return f"{check_name(name)}_image", f"{name}_text"


def repository_names(repository: Path) -> list[str]:
    """The models exported into `repository`: `clip` first when present, then by name."""
    root = Path(repository)
    names = [DEFAULT_NAME] if (root / METADATA_FILE).is_file() else []
    for path in sorted(root.glob("metadata.*.json")):
        name = path.name[len("metadata.") : -len(".json")]
        if _NAME_PATTERN.fullmatch(name) and name != DEFAULT_NAME:
            names.append(name)
    return names


def load_repository(repository: Path) -> dict[str, ModelMetadata]:
    """Every model of `repository` by name (`repository_names` order); raises when none."""
    names = repository_names(repository)
    if not names:
        raise FileNotFoundError(
            f"no {METADATA_FILE} (or metadata.NAME.json) in {repository}: export a model "
            "first (`make model` or `clipsvc export --out DIR`)"
        )
    return {name: ModelMetadata.load(repository, name) for name in names}


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
    #: What the towers compute in: "fp32", "fp16" (`clipsvc export --precision`), or
    #: "trt-fp16" (onnx `--tensorrt`: TensorRT runs them in fp16 on Triton's GPUs).
    precision: str = "fp32"
    versions: dict[str, str] = field(default_factory=dict)
    #: The name it is served under (`clipsvc export --name`); from the file's name on load.
    name: str = DEFAULT_NAME
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
        """Write this model's metadata file (`metadata_path`) into `directory`."""
        path = metadata_path(directory, self.name)
        raw = asdict(self)
        del raw["repository"]
        path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path, name: str = DEFAULT_NAME) -> ModelMetadata:
        """Read model `name`'s metadata from an exported model repository."""
        path = metadata_path(directory, name)
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
        loaded = cls(**{k: v for k, v in raw.items() if k in known})
        return replace(loaded, name=name)  # the file decides, whatever it says inside
