"""open_clip → TorchScript → Triton model repository + `metadata.json`.

`clipsvc export --model NAME|PATH.json --pretrained TAG|none|PATH --out DIR
--flavor pytorch|python|onnx [--name NAME]`: several exports with different `--name`s share
one `--out` repository; each writes only its own `NAME_image/`, `NAME_text/` and metadata
file (see `service/model/metadata.py` for the layout).

A repository is self-contained: a HF tokenizer's files are copied into `NAME_text/tokenizer/`
and the metadata says how to use them (clean function, padding rule, pad and special ids),
so serving needs neither a model hub nor the config the model was exported from.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from service.extras import MissingExtra

try:  # before the modules below, which import torch too
    import open_clip
    import torch
except ImportError as exc:  # the gateway install leaves the exporter's packages out
    raise MissingExtra("export", "clipsvc export", exc.name) from exc

from service.model import configs as model_configs
from service.model.encoders import TEXT_PADDING_FULL, build_encoders, script_encoders
from service.model.metadata import (
    DEFAULT_NAME,
    IMAGE_INPUT,
    OUTPUT,
    TEXT_INPUT,
    ModelMetadata,
    check_name,
    metadata_path,
    tower_models,
)
from service.model.onnx_graphs import ONNX_FILE, export_onnx, open_session, run_session
from service.model.triton_config import FLAVORS, TensorSpec, render_config
from service.settings import BatchingOptions

_LOGGER = logging.getLogger(__name__)
_PYTHON_MODEL = Path(__file__).resolve().parent / "triton_python_model.py"


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote."""

    out_dir: Path
    metadata: ModelMetadata
    files: dict[str, int]
    seconds: float
    max_abs_diff: float
    #: The lowest cosine between an exported vector and open_clip's (1.0 within rounding
    #: for fp32; the fp16 self-check wants at least 0.999).
    worst_cosine: float

    def render(self) -> str:
        """Human-readable summary for the CLI."""
        m = self.metadata
        lines = [
            f"exported {m.model_name} ({m.pretrained}) → {self.out_dir} in {self.seconds:.1f}s",
            f"  model id      {m.model_id}",
            f"  embedding dim {m.embedding_dim}, image {m.image_size}px, "
            f"context {m.context_length} tokens, logit scale {m.logit_scale:.2f}",
            f"  text          {m.tokenizer} tokenizer, padding {m.text_padding}, "
            f"scores {m.score_function}"
            + (f" (bias {m.logit_bias:.2f})" if m.logit_bias is not None else "")
            + (f", {len(m.languages)} languages (default {m.language})" if m.languages else ""),
            f"  flavor        {m.flavor}, {m.precision}",
            f"  check vs open_clip: max |diff| = {self.max_abs_diff:.2e}, "
            f"worst cosine = {self.worst_cosine:.6f}",
        ]
        total = 0
        for name, size in sorted(self.files.items()):
            lines.append(f"  {size / 1e6:9.2f} MB  {name}")
            total += size
        lines.append(f"  {total / 1e6:9.2f} MB  total")
        return "\n".join(lines)


def resolve_model_name(model: str) -> str:
    """An open_clip model name as given, or, for the path of a model-config JSON, its file
    stem once the config is registered with open_clip."""
    model_configs.register()
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} not found")
        open_clip.add_model_config(path)
        return path.stem
    return model


def load_open_clip(model_name: str, pretrained: str) -> tuple[torch.nn.Module, str]:
    """The open_clip model in eval mode and the pretrained label to record
    (`model_name`: a name or a model-config JSON path, see `resolve_model_name`)."""
    model_name = resolve_model_name(model_name)
    if pretrained.lower() in ("", "none"):
        weights, label = None, "none"
    else:
        weights = pretrained
        label = Path(pretrained).stem if Path(pretrained).is_file() else pretrained
    # Random weights mean random text weights too: no HF download for an HF text tower.
    model = open_clip.create_model(
        model_name, pretrained=weights, device="cpu", pretrained_text=weights is not None
    )
    return model.eval(), label


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of every tensor of the state dict (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def export_model(
    model_name: str,
    pretrained: str,
    out_dir: Path,
    *,
    flavor: str = "python",
    tensorrt: bool = False,
    precision: str = "fp32",
    batching: BatchingOptions | None = None,
    progress: bool = True,
    name: str = DEFAULT_NAME,
) -> ExportSummary:
    """Export both encoders of an open_clip model into a Triton model repository.

    The files are written to a staging folder and checked against open_clip there; the
    repository's files are only touched once the check passed, and only model `name`'s
    (`NAME_image/`, `NAME_text/`, its metadata file): other models stay as they are.
    """
    check_name(name)
    image_model, text_model = tower_models(name)
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}, not {flavor!r}")
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be fp32 or fp16, not {precision!r}")
    if precision == "fp16" and flavor == "onnx":
        raise ValueError("fp16 is for the TorchScript flavors; the onnx flavor has --tensorrt")
    batching = batching or BatchingOptions()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    steps = tqdm(total=5, desc="export", disable=not progress, unit="step")

    steps.set_postfix_str(f"loading {model_name}")
    model_name = resolve_model_name(model_name)
    clip, label = load_open_clip(model_name, pretrained)
    cfg = clip.visual.preprocess_cfg
    image_size = int(cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0])
    # What `open_clip.get_tokenizer(model)` pads to (the text config's context length):
    # for HF text towers `clip.context_length` is the tower's position count instead.
    tokenizer = open_clip.get_tokenizer(model_name)
    context_length = int(tokenizer.context_length)
    check_tokens = tokenizer(CHECK_TEXTS)
    steps.update()

    # Staged inside `out_dir`: the same filesystem, so the files are moved, not copied, and
    # a large model does not have to fit in /tmp.
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as staging_dir:
        staging = Path(staging_dir)
        if flavor == "onnx":
            steps.set_postfix_str("exporting encoders to ONNX")
            image_run, text_run, text_padding = _stage_onnx(
                clip,
                staging,
                image_size,
                context_length,
                batching.torch_threads,
                (image_model, text_model),
                check_tokens,
            )
        else:
            steps.set_postfix_str("scripting encoders")
            image_run, text_run, text_padding = _stage_torchscript(
                clip,
                staging,
                (image_model, text_model),
                fp16=precision == "fp16",
                text_example=check_tokens,
            )
        tokenizer_fields = _stage_tokenizer(tokenizer, staging, tokenizer_dir(text_model))
        steps.update()

        steps.set_postfix_str("checking against open_clip")
        max_diff, worst_cosine = _self_check(
            clip,
            image_run,
            text_run,
            check_tokens,
            image_size,
            full_padding=text_padding == TEXT_PADDING_FULL,
            min_cosine=_FP16_MIN_COSINE if precision == "fp16" else None,
        )
        embedding_dim = int(text_run(check_tokens[:1]).shape[-1])
        steps.update()

        steps.set_postfix_str("writing repository")
        logit_bias = getattr(clip, "logit_bias", None)
        metadata = ModelMetadata(
            model_name=model_name,
            pretrained=label,
            weights_sha256=weights_sha256(clip),
            embedding_dim=embedding_dim,
            image_size=image_size,
            context_length=context_length,
            logit_scale=float(clip.logit_scale.exp().item()),
            logit_bias=None if logit_bias is None else float(logit_bias.item()),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            resize_mode=str(cfg.get("resize_mode", "shortest")),
            flavor=flavor,
            # TensorRT computes in fp16: its vectors must not share cache entries (keyed
            # by model_id) with the fp32 ONNX Runtime ones of the same weights.
            precision="trt-fp16" if tensorrt else precision,
            versions=_versions(flavor),
            image_model=image_model,
            text_model=text_model,
            name=name,
            text_padding=text_padding,
            **tokenizer_fields,
        )
        _check_tokenizer(metadata, staging, tokenizer)
        if metadata.resize_mode != "shortest":
            raise ValueError(
                f"resize mode {metadata.resize_mode!r} is not supported (shortest only)"
            )
        towers = {
            image_model: TensorSpec(IMAGE_INPUT, "TYPE_UINT8", (3, image_size, image_size)),
            text_model: (
                TensorSpec(TEXT_INPUT, "TYPE_INT64", (context_length,))
                if text_padding == TEXT_PADDING_FULL
                else TensorSpec(TEXT_INPUT, "TYPE_INT64", (-1,), ragged=True)
            ),
        }
        for tower, input_spec in towers.items():
            version_dir = out_dir / tower / "1"
            version_dir.mkdir(parents=True, exist_ok=True)
            # Files of another flavor left by an earlier export would be served by mistake.
            for stale in _MODEL_FILES:
                (version_dir / stale).unlink(missing_ok=True)
            for staged in sorted((staging / tower).iterdir()):
                if tower == text_model and staged.name == "tokenizer":
                    continue  # not a version's file: it goes beside the versions, below
                shutil.move(str(staged), str(version_dir / staged.name))
            if flavor == "python":
                shutil.copyfile(_PYTHON_MODEL, version_dir / "model.py")
            config = render_config(
                name=tower,
                flavor=flavor,
                inputs=[input_spec],
                outputs=[TensorSpec(OUTPUT, "TYPE_FP32", (embedding_dim,))],
                batching=batching,
                tensorrt=tensorrt,
                parameters=metadata.triton_parameters(),
            )
            (out_dir / tower / "config.pbtxt").write_text(config)
        own_tokenizer = tokenizer_dir(text_model)
        shutil.rmtree(out_dir / own_tokenizer, ignore_errors=True)
        if (staging / own_tokenizer).is_dir():
            shutil.move(str(staging / own_tokenizer), str(out_dir / own_tokenizer))
    metadata.save(out_dir)
    files: dict[str, int] = {}
    own = [out_dir / image_model, out_dir / text_model, metadata_path(out_dir, name)]
    for path in sorted(p for top in own for p in [top, *top.rglob("*")]):
        if path.is_file():
            files[str(path.relative_to(out_dir))] = path.stat().st_size
    steps.update()
    steps.set_postfix_str("done")
    steps.update()
    steps.close()
    return ExportSummary(
        out_dir, metadata, files, time.perf_counter() - started, max_diff, worst_cosine
    )


#: What an export may have left in a version folder; a new export removes them all first.
_MODEL_FILES = ("model.pt", "model.py", ONNX_FILE, ONNX_FILE + ".data")
Encode = Callable[[torch.Tensor], torch.Tensor]


#: Texts the export checks tokenizer and text tower on: empty, short, long, past the
#: context, scripts other than Latin, punctuation, odd whitespace and case.
CHECK_TEXTS = [
    "",
    "a photo of a cat",
    "A Diagram of " + "a red circle beside " * 4,
    "x " * 200,
    "一只在雪地里玩耍的金毛猎犬",
    "Кошка, сидящая на подоконнике!",
    "tabs\tand\nnewlines   and CAPS_with_underscores & <b>html</b>",
]


def tokenizer_dir(text_model: str) -> str:
    """The folder of a repository that holds a HF tokenizer's files: `tokenizer/` inside
    the text tower's Triton folder, so several models of one repository never share one
    and Triton (which loads only numbered version folders there) never sees it."""
    return f"{text_model}/tokenizer"


def _stage_tokenizer(tokenizer: object, staging: Path, folder: str) -> dict[str, object]:
    """A HF tokenizer's files copied to `folder` and the metadata fields that
    describe it; {} for open_clip's CLIP BPE (the gateway has it built in)."""
    if isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        return {}
    if not isinstance(tokenizer, open_clip.tokenizer.HFTokenizer):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} is not supported")
    if tokenizer.tokenizer_mode:
        raise ValueError(f"HF tokenizer mode {tokenizer.tokenizer_mode!r} is not supported")
    hf = tokenizer.tokenizer
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"{type(hf).__name__} has no fast (tokenizers) version")
    for side in ("padding_side", "truncation_side"):
        if getattr(hf, side, "right") != "right":
            raise ValueError(f"{side.replace('_', ' ')} {getattr(hf, side)!r} is not supported")
    hf.save_pretrained(str(staging / folder))
    special = {
        role: int(token_id)
        for role in ("bos", "eos", "pad", "sep", "cls", "unk", "mask")
        if (token_id := getattr(hf, f"{role}_token_id", None)) is not None
    }
    clean = {v: k for k, v in _CLEAN_NAMES.items()}.get(tokenizer.clean_fn)
    if clean is None:
        raise ValueError(f"clean function {tokenizer.clean_fn!r} is not supported")
    # Towers that take a language (NLLB): the tokenizer's source language and the codes a
    # request may name (its extra special tokens other than the roles above).
    language = getattr(hf, "src_lang", None) if hasattr(tokenizer, "set_lang_fn") else None
    languages: tuple[str, ...] = ()
    if language:
        extra = getattr(hf, "extra_special_tokens", None) or getattr(
            hf, "additional_special_tokens", None
        )
        roles = set(hf.special_tokens_map.values())
        languages = tuple(str(t) for t in (extra or ()) if str(t) not in roles)
    return {
        "tokenizer": "hf",
        "tokenizer_file": f"{folder}/tokenizer.json",
        "tokenizer_clean": clean,
        "pad_token_id": int(hf.pad_token_id or 0),
        "strip_sep_token_id": (
            int(hf.sep_token_id)
            if tokenizer.strip_sep_token and hf.sep_token_id is not None
            else None
        ),
        "special_tokens": special,
        "language": language,
        "languages": languages,
    }


_CLEAN_NAMES = {
    name: open_clip.tokenizer.get_clean_fn(name) for name in ("whitespace", "canonicalize", "lower")
}


def _check_tokenizer(metadata: ModelMetadata, staging: Path, tokenizer: object) -> None:
    """The gateway's tokenizer, built from the staged files, against open_clip's: the
    same ids on `CHECK_TEXTS` (padded by the repository's rule), else the export stops."""
    from dataclasses import replace

    from service.core.hf_tokenize import build_tokenizer

    ours = build_tokenizer(replace(metadata, repository=str(staging)), (8, 16, 32))
    want = tokenizer(CHECK_TEXTS)  # type: ignore[operator]
    rows = [ours.tokenize(text) for text in CHECK_TEXTS]
    for text, tokens, row in zip(CHECK_TEXTS, rows, want.tolist(), strict=True):
        padded = ours.pad([tokens], metadata.context_length)[0].tolist()
        if padded != row:
            raise RuntimeError(
                f"the gateway's tokenizer differs from open_clip's on {text[:40]!r}: "
                f"{padded[:12]}... vs {row[:12]}..."
            )
        if tokens.truncated != (text == CHECK_TEXTS[3]) and text in ("", CHECK_TEXTS[3]):
            raise RuntimeError(f"truncation flag {tokens.truncated} is wrong for {text[:40]!r}")
    other = [code for code in metadata.languages if code != metadata.language][-1:]
    for language in other:
        # The reference: transformers' tokenizer with `src_lang` set (open_clip's
        # `set_language` calls `set_src_lang_special_tokens`, which transformers 5.24's NLLB
        # tokenizer ignores; the `src_lang` setter is what changes the language token).
        hf = tokenizer.tokenizer  # type: ignore[attr-defined]
        try:
            hf.src_lang = language
            want = tokenizer(CHECK_TEXTS[:3])  # type: ignore[operator]
        finally:
            hf.src_lang = metadata.language
        for text, row in zip(CHECK_TEXTS[:3], want.tolist(), strict=True):
            got = ours.pad([ours.tokenize(text, language)], metadata.context_length)  # type: ignore[call-arg]
            if got[0].tolist() != row:
                raise RuntimeError(
                    f"the gateway's tokenizer differs from open_clip's in {language} on {text!r}"
                )


def _stage_torchscript(
    clip: torch.nn.Module,
    staging: Path,
    towers: tuple[str, str],
    *,
    fp16: bool,
    text_example: torch.Tensor,
) -> tuple[Encode, Encode, str]:
    """Both towers as `<tower>/model.pt` (they also run the self-check) and the padding rule."""
    image_ts, text_ts, padding = script_encoders(clip, fp16=fp16, text_example=text_example)
    for name, module in zip(towers, (image_ts, text_ts), strict=True):
        (staging / name).mkdir()
        torch.jit.save(module, str(staging / name / "model.pt"))
    return image_ts, text_ts, padding


def _stage_onnx(
    clip: torch.nn.Module,
    staging: Path,
    image_size: int,
    context_length: int,
    threads: int,
    towers: tuple[str, str],
    text_example: torch.Tensor,
) -> tuple[Encode, Encode, str]:
    """Both towers as `<tower>/model.onnx` (the self-check runs the files in ONNX Runtime)
    and the text padding rule."""
    image, text, padding = build_encoders(clip)
    image_model, text_model = towers
    full = padding == TEXT_PADDING_FULL
    # Example sizes that differ from each other and from 1: torch.export would otherwise
    # tie equal dimensions together or fix them at 1.
    examples = {
        image_model: (image, torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)),
        text_model: (
            text,
            text_example[:2] if full else torch.ones(2, min(5, context_length), dtype=torch.long),
        ),
    }
    runs: list[Encode] = []
    for name, (module, example) in examples.items():
        (staging / name).mkdir()
        path = staging / name / ONNX_FILE
        input_name = IMAGE_INPUT if name == image_model else TEXT_INPUT
        export_onnx(
            module,
            example,
            path,
            input_name=input_name,
            output_name=OUTPUT,
            dynamic_length=context_length if name == text_model and not full else None,
            what=f"{'image' if name == image_model else 'text'} tower of {type(clip).__name__}",
        )
        session = open_session(path, intra_op_threads=threads)
        runs.append(
            lambda rows, s=session, n=input_name: torch.from_numpy(run_session(s, n, rows.numpy()))
        )
    return runs[0], runs[1], padding


def _versions(flavor: str) -> dict[str, str]:
    versions = {"open_clip": open_clip.__version__, "torch": torch.__version__}
    if flavor == "onnx":
        import onnx
        import onnxruntime

        versions |= {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    return versions


def _self_check(
    clip: torch.nn.Module,
    encode_image: Encode,
    encode_text: Encode,
    tokens: torch.Tensor,
    image_size: int,
    *,
    full_padding: bool = False,
    min_cosine: float | None = None,
) -> tuple[float, float]:
    """(largest |exported - open_clip|, lowest cosine) over random images (batches of 3
    and 1) and texts of several lengths (`tokens`: open_clip's rows; each alone, cut at its
    end-of-text and padded a little past it unless `full_padding`, and all together at the
    full context). Raises past 1e-4, or, with `min_cosine` (fp16 towers against float32
    open_clip), below that cosine."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(
        0, 256, (3, 3, image_size, image_size), dtype=torch.uint8, generator=generator
    )
    cfg = clip.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    diffs: list[float] = []
    cosines: list[float] = []

    def compare(want: torch.Tensor, got: torch.Tensor) -> None:
        diffs.append(_max_diff(want, got))
        cosines.append(float((want * got).sum(dim=-1).min().item()))

    with torch.no_grad():
        want_image = clip.encode_image((pixels.float() / 255 - mean) / std, normalize=True)
        want_text = clip.encode_text(tokens, normalize=True)
        compare(want_image, encode_image(pixels))
        compare(want_image[:1], encode_image(pixels[:1]))
        context = tokens.shape[1]
        for row, length in enumerate((tokens != 0).sum(dim=1).tolist()):
            cuts = {context} if full_padding else {length, min(length + 5, context)}
            for cut in sorted(cuts):
                got = encode_text(tokens[row : row + 1, :cut].contiguous())
                compare(want_text[row : row + 1], got)
        compare(want_text, encode_text(tokens))
    diff, worst = max(diffs), min(cosines)
    if min_cosine is not None:
        if worst < min_cosine:
            raise RuntimeError(
                f"exported encoders reach cosine {worst:.6f} with open_clip, below {min_cosine}"
            )
    elif diff > 1e-4:
        raise RuntimeError(f"exported encoders differ from open_clip by {diff:.2e}")
    return diff, worst


_FP16_MIN_COSINE = 0.999


def _max_diff(want: torch.Tensor, got: torch.Tensor) -> float:
    if got.shape != want.shape:
        raise RuntimeError(f"exported encoder answered {tuple(got.shape)}, not {tuple(want.shape)}")
    return float((want - got).abs().max().item())
