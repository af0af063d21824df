"""The exported graphs: open_clip's towers wrapped so Triton sees only fixed dtypes.

`ImageEncoder` takes `uint8 [B,3,S,S]` (already resized and cropped) and does /255,
mean/std, the tower and L2 normalization on the device. `TextEncoder` takes
`int64 [B,L]` for any 1 ≤ L ≤ context length: CLIP's text tower is causal and pools
at the end-of-text token, so cutting padding (and the positional embedding and mask
with it) gives the same vectors as open_clip's 77-padded `encode_text` for much less work.

Every other text tower (SigLIP's `last` pooling without a causal mask, HF towers with a
padding mask, CoCa's appended class token, MobileCLIP's) is `FullTextEncoder`: it takes
exactly the context length open_clip pads to (padding rule "full") and runs the tower as
open_clip does. `TEXT_PADDING_TRIM` / `TEXT_PADDING_FULL` name the two rules in
`metadata.json`; the gateway pads accordingly.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

_LOGGER = logging.getLogger(__name__)

#: The text graph takes any length up to the context (the gateway trims padding).
TEXT_PADDING_TRIM = "trim"
#: The text graph takes exactly the context length, padded as open_clip pads.
TEXT_PADDING_FULL = "full"


class ImageEncoder(nn.Module):
    """uint8 pixels → L2-normalized image embedding, as open_clip's `encode_image`."""

    def __init__(self, visual: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.visual = visual
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # The tower's dtype (float32, or float16 after `.half()`), read where TorchScript can.
        weight = next(visual.parameters())
        self.register_buffer("tower_dtype", torch.zeros(0, dtype=weight.dtype))

    def forward(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        # Same ops and order as torchvision's ToTensor + Normalize, so bit-identical; in
        # float32 whatever the tower's precision (no-op casts for a float32 tower).
        x = pixels_uint8.to(torch.float32).div(255)
        x = x.sub(self.mean).div(self.std).to(self.tower_dtype.dtype)
        return F.normalize(self.visual(x).to(torch.float32), dim=-1)


class _FirstOutput(nn.Module):
    """A tower that answers `(pooled, tokens)` (CoCa, `output_tokens`) cut to its pooled
    output; traced (TorchScript cannot script the tuple-or-tensor branch)."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tower(x)
        return out[0] if isinstance(out, tuple) else out


class FullTextEncoder(nn.Module):
    """Token ids `[B, context]`, padded as open_clip pads them → L2-normalized embedding,
    computed by the model's own text tower (`CustomTextCLIP.text`, `CoCa.text`, HF)."""

    def __init__(self, tower: nn.Module):
        """`tower`: a text tower module, or a `CLIP` (its text parts are taken, see
        `_ClipText`)."""
        super().__init__()
        # A whole `CLIP` (it has the image tower too): keep only its text modules.
        self.tower = _ClipText(tower) if hasattr(tower, "visual") else tower

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        out = self.tower(token_ids)
        if isinstance(out, tuple):
            out = out[0]
        return F.normalize(out.to(torch.float32), dim=-1)


class _ClipText(nn.Module):
    """The text half of an open_clip `CLIP` whose padding cannot be cut (pooling `last` or
    `eos`, no causal mask: CLIPA, MetaCLIP 2 worldwide): open_clip's own `encode_text` run
    on the text modules alone, so the text graph carries no image weights."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.text_pool_type = clip.text_pool_type
        self.text_eos_id = getattr(clip, "text_eos_id", None)
        self._encode_text = type(clip).encode_text

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._encode_text(self, token_ids, normalize=False)


class TextEncoder(nn.Module):
    """Token ids `[B,L]` (L ≤ context length) → L2-normalized text embedding."""

    def __init__(self, clip: nn.Module):
        """`clip`: an open_clip `CLIP` or a `TextTransformer` that `trim_refusal` accepts."""
        super().__init__()
        reason = trim_refusal(clip)
        if reason:
            raise ValueError(f"this text tower cannot be cut to the real length: {reason}")
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        projection = clip.text_projection
        if isinstance(projection, nn.Linear):
            self.projection = projection
        elif isinstance(projection, torch.Tensor):
            self.projection = _MatMul(projection)
        else:
            raise ValueError("models without a text projection are not supported")
        self.register_buffer("attn_mask", clip.attn_mask.clone(), persistent=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        length = token_ids.shape[1]
        x = self.token_embedding(token_ids) + self.positional_embedding[:length]
        # A sliced (non-contiguous) mask sends attention down a slow path.
        mask = self.attn_mask[:length, :length].contiguous()
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        # End-of-text has the highest id, so argmax finds it (open_clip's 'argmax' pool).
        x = x[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)]
        return F.normalize(self.projection(x).to(torch.float32), dim=-1)


def trim_refusal(tower: nn.Module) -> str:
    """Why padding cannot be cut for `tower` (a `CLIP` or a `TextTransformer`); "" if it can:
    a causal mask, pooling at the end-of-text (argmax), no padding mask, no class token."""
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    if pool != "argmax":
        return f"it pools {pool!r}, not at the end-of-text token (argmax)"
    if not hasattr(tower, "token_embedding") or not hasattr(tower, "ln_final"):
        return f"{type(tower).__name__} is not open_clip's built-in text transformer"
    if getattr(tower, "attn_mask", None) is None:
        return "it has no causal mask (padding would be attended to)"
    if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        return "it appends a class token or masks padding"
    if getattr(tower, "text_projection", None) is None:
        return "it has no text projection"
    return ""


def text_tower(clip: nn.Module) -> nn.Module:
    """The module that holds the text tower: the `CLIP` itself or its `.text`."""
    return clip if hasattr(clip, "token_embedding") else clip.text


class _MatMul(nn.Module):
    """`x @ weight`, kept as a matmul (not F.linear) to match open_clip bit for bit."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def build_encoders(
    clip: nn.Module, *, fp16: bool = False, text_padding: str | None = None
) -> tuple[nn.Module, nn.Module, str]:
    """Both towers of an open_clip model wrapped as the exported graphs (eval mode), and the
    text padding rule; with `fp16`, a half-precision copy (inputs, normalisation and outputs
    stay float32). `text_padding` None: "trim" where the tower allows it, else "full"."""
    if fp16:
        clip = copy.deepcopy(clip).half()
    cfg = clip.visual.preprocess_cfg
    visual = clip.visual
    if getattr(visual, "output_tokens", False):  # CoCa: (pooled, tokens)
        visual = _FirstOutput(visual)
    image = ImageEncoder(visual, tuple(cfg["mean"]), tuple(cfg["std"]))
    tower = text_tower(clip)
    if text_padding is None:
        text_padding = TEXT_PADDING_FULL if trim_refusal(tower) else TEXT_PADDING_TRIM
    text = TextEncoder(tower) if text_padding == TEXT_PADDING_TRIM else FullTextEncoder(tower)
    return image.eval(), text.eval(), text_padding


def script_encoders(
    clip: nn.Module, *, fp16: bool = False, text_example: torch.Tensor | None = None
) -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule, str]:
    """TorchScript of both towers and the text padding rule.

    Scripted where TorchScript can (a trimmed text tower must be: its length stays dynamic);
    else traced on examples (`text_example`: open_clip-padded ids of varied texts, so
    data-dependent branches such as "is there any padding" take the general path). The
    exporter's self-check runs the result against open_clip either way.
    """
    image, text, padding = build_encoders(clip, fp16=fp16)
    size = clip.visual.preprocess_cfg["size"]
    size = int(size if isinstance(size, int) else size[0])
    with torch.no_grad():
        image_ts = _script_or_trace(image, torch.zeros(2, 3, size, size, dtype=torch.uint8))
        try:
            text_ts = torch.jit.script(text)
        except Exception as exc:
            _LOGGER.warning(
                "text tower of %s not scriptable (%s: %s); traced at the full context",
                type(clip).__name__,
                type(exc).__name__,
                str(exc).splitlines()[0][:200] if str(exc) else "",
            )
            if padding == TEXT_PADDING_TRIM:
                _, text, padding = build_encoders(clip, fp16=fp16, text_padding=TEXT_PADDING_FULL)
            if text_example is None:
                text_example = torch.ones(2, int(clip.context_length), dtype=torch.long)
            text_ts = torch.jit.trace(text, text_example, check_trace=False)
    return image_ts, text_ts, padding


def _script_or_trace(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    try:
        return torch.jit.script(module)
    except Exception:
        return torch.jit.trace(module, example, check_trace=False)
