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
