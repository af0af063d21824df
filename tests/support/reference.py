"""What open_clip itself makes of texts and images: the reference the served vectors meet."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import torch
from PIL import Image

from tests.support.models import ExportedModel


def reference_texts(model: ExportedModel, texts: list[str]) -> np.ndarray:
    """open_clip's normalized text vectors, `[len(texts), D]`."""
    with torch.no_grad():
        tokens = open_clip.get_tokenizer(model.name)(texts)
        return model.clip.encode_text(tokens, normalize=True).numpy()


def reference_images(model: ExportedModel, blobs: list[bytes]) -> np.ndarray:
    """open_clip's normalized image vectors (its own preprocessing), `[len(blobs), D]`."""
    _, _, preprocess = open_clip.create_model_and_transforms(model.name, pretrained=None)
    batch = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in blobs])
    with torch.no_grad():
        return model.clip.encode_image(batch, normalize=True).numpy()


def exported_image_vectors(model: ExportedModel, images: list[bytes]) -> np.ndarray:
    """The exported image tower's vectors of `images`, decoded by the gateway's own code."""
    from service.core.image_preprocess import ImageLimits, ImageSpec, preprocess_image_bytes

    module = torch.jit.load(str(model.repository / "clip_image" / "1" / "model.pt")).eval()
    spec, limits = ImageSpec(64), ImageLimits(1 << 24, 1 << 26)
    pixels = np.stack([preprocess_image_bytes(b, spec, limits) for b in images])
    with torch.no_grad():
        return module(torch.from_numpy(pixels)).numpy()
