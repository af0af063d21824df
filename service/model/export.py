"""open_clip → TorchScript → Triton model repository + `metadata.json`.

`clipsvc export --model NAME --pretrained TAG|none|PATH --out DIR --flavor pytorch|python`
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from tqdm import tqdm

from service.model import configs as model_configs
from service.model.encoders import script_encoders
from service.model.metadata import (
    IMAGE_INPUT,
    IMAGE_MODEL,
    OUTPUT,
    TEXT_INPUT,
    TEXT_MODEL,
    ModelMetadata,
)
from service.model.triton_config import TensorSpec, render_config
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

    def render(self) -> str:
        """Human-readable summary for the CLI."""
        m = self.metadata
        lines = [
            f"exported {m.model_name} ({m.pretrained}) → {self.out_dir} in {self.seconds:.1f}s",
            f"  model id      {m.model_id}",
            f"  embedding dim {m.embedding_dim}, image {m.image_size}px, "
            f"context {m.context_length} tokens, logit scale {m.logit_scale:.2f}",
            f"  check vs open_clip: max |diff| = {self.max_abs_diff:.2e}",
        ]
        total = 0
        for name, size in sorted(self.files.items()):
            lines.append(f"  {size / 1e6:9.2f} MB  {name}")
            total += size
        lines.append(f"  {total / 1e6:9.2f} MB  total")
        return "\n".join(lines)


def load_open_clip(model_name: str, pretrained: str) -> tuple[torch.nn.Module, str]:
    """The open_clip model in eval mode and the pretrained label to record."""
    model_configs.register()
    if pretrained.lower() in ("", "none"):
        weights, label = None, "none"
    else:
        weights = pretrained
        label = Path(pretrained).stem if Path(pretrained).is_file() else pretrained
    model = open_clip.create_model(model_name, pretrained=weights, device="cpu")
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
    batching: BatchingOptions | None = None,
    progress: bool = True,
) -> ExportSummary:
    """Export both encoders of an open_clip model into a Triton model repository."""
    batching = batching or BatchingOptions()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    steps = tqdm(total=5, desc="export", disable=not progress, unit="step")

    steps.set_postfix_str(f"loading {model_name}")
    clip, label = load_open_clip(model_name, pretrained)
    steps.update()

    steps.set_postfix_str("scripting encoders")
    image_ts, text_ts = script_encoders(clip)
    steps.update()

    steps.set_postfix_str("checking against open_clip")
    cfg = clip.visual.preprocess_cfg
    image_size = int(cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0])
    context_length = int(clip.context_length)
    tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length)
    max_diff = _self_check(clip, image_ts, text_ts, tokenizer, image_size)
    steps.update()

    steps.set_postfix_str("writing repository")
    embedding_dim = int(text_ts(torch.ones(1, 2, dtype=torch.long)).shape[-1])
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
        versions={"open_clip": open_clip.__version__, "torch": torch.__version__},
    )
    if metadata.resize_mode != "shortest":
        raise ValueError(f"resize mode {metadata.resize_mode!r} is not supported (shortest only)")
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, int] = {}
    towers = {
        IMAGE_MODEL: (image_ts, TensorSpec(IMAGE_INPUT, "TYPE_UINT8", (3, image_size, image_size))),
        TEXT_MODEL: (text_ts, TensorSpec(TEXT_INPUT, "TYPE_INT64", (-1,), ragged=True)),
    }
    for name, (module, input_spec) in towers.items():
        version_dir = out_dir / name / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        torch.jit.save(module, str(version_dir / "model.pt"))
        stale_model_py = version_dir / "model.py"
        if flavor == "python":
            shutil.copyfile(_PYTHON_MODEL, stale_model_py)
        elif stale_model_py.exists():
            stale_model_py.unlink()
        config = render_config(
            name=name,
            flavor=flavor,
            inputs=[input_spec],
            outputs=[TensorSpec(OUTPUT, "TYPE_FP32", (embedding_dim,))],
            batching=batching,
            parameters=metadata.triton_parameters(),
        )
        (out_dir / name / "config.pbtxt").write_text(config)
    metadata.save(out_dir)
    for path in sorted(out_dir.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(out_dir))] = path.stat().st_size
    steps.update()
    steps.set_postfix_str("done")
    steps.update()
    steps.close()
    return ExportSummary(out_dir, metadata, files, time.perf_counter() - started, max_diff)


def _self_check(
    clip: torch.nn.Module,
    image_ts: torch.jit.ScriptModule,
    text_ts: torch.jit.ScriptModule,
    tokenizer: open_clip.tokenizer.SimpleTokenizer,
    image_size: int,
) -> float:
    """Largest |exported - open_clip| on a random image and a short and a full text."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(
        0, 256, (2, 3, image_size, image_size), dtype=torch.uint8, generator=generator
    )
    cfg = clip.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    tokens = tokenizer(["a photo of a cat", "x " * 200])
    with torch.no_grad():
        want_image = clip.encode_image((pixels.float() / 255 - mean) / std, normalize=True)
        want_text = clip.encode_text(tokens, normalize=True)
        short = int((tokens != 0).sum(dim=1).max())
        got_image = image_ts(pixels)
        got_text = text_ts(tokens[:, :short])
    diff = max(
        (want_image - got_image).abs().max().item(), (want_text - got_text).abs().max().item()
    )
    if diff > 1e-4:
        raise RuntimeError(f"exported encoders differ from open_clip by {diff:.2e}")
    return diff
