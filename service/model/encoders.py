"""The exported graphs: open_clip's towers wrapped so Triton sees only fixed dtypes.

`ImageEncoder` takes `uint8 [B,3,S,S]` (already resized and cropped) and does /255,
mean/std, the tower and L2 normalization on the device. `TextEncoder` takes
`int64 [B,L]` for any 1 ≤ L ≤ context length: CLIP's text tower is causal and pools
at the end-of-text token, so cutting padding (and the positional embedding and mask
with it) gives the same vectors as open_clip's 77-padded `encode_text` for much less work.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


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


class TextEncoder(nn.Module):
    """Token ids `[B,L]` (L ≤ context length) → L2-normalized text embedding."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        if getattr(clip, "text_pool_type", "argmax") != "argmax":
            raise ValueError(
                f"text pooling {clip.text_pool_type!r} is not supported; "
                "only CLIP's end-of-text (argmax) pooling can be cut to the real length"
            )
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


class _MatMul(nn.Module):
    """`x @ weight`, kept as a matmul (not F.linear) to match open_clip bit for bit."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def build_encoders(clip: nn.Module, *, fp16: bool = False) -> tuple[ImageEncoder, TextEncoder]:
    """Both towers of an open_clip model wrapped as the exported graphs (eval mode); with
    `fp16`, a half-precision copy (inputs, normalisation and outputs stay float32)."""
    if fp16:
        clip = copy.deepcopy(clip).half()
    cfg = clip.visual.preprocess_cfg
    image = ImageEncoder(clip.visual, tuple(cfg["mean"]), tuple(cfg["std"])).eval()
    return image, TextEncoder(clip).eval()


def script_encoders(
    clip: nn.Module, *, fp16: bool = False
) -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule]:
    """TorchScript (scripted, not traced: the text length must stay dynamic) of both towers."""
    image, text = build_encoders(clip, fp16=fp16)
    with torch.no_grad():
        return torch.jit.script(image), torch.jit.script(text)
