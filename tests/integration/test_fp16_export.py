"""`clipsvc export --precision fp16` (issue 15): half weights, float32 in and out, and
vectors within cosine 0.999 of float32 open_clip, checked by the export and here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from service.client import AsyncClipClient
from service.model.export import export_model, load_open_clip
from service.model.metadata import IMAGE_MODEL, TEXT_MODEL, ModelMetadata
from service.processes.gateway import gateway_settings, running_gateway
from tests.support.images import encode, photo_like
from tests.support.paths import DEMO_WEIGHTS

pytestmark = pytest.mark.integration

MIN_COSINE = 0.999
TEXTS = ["a red circle", "a photo of a blue star on a striped background", "x " * 100]


@pytest.mark.parametrize(
    ("model", "weights"), [("clip-demo-shapes", str(DEMO_WEIGHTS)), ("ViT-B-32", "seeded")]
)
async def test_fp16_export_serves_vectors_close_to_fp32_open_clip(
    model: str, weights: str, tmp_path: Path
) -> None:
    if weights == "seeded":
        torch.manual_seed(7)
        clip, _ = load_open_clip(model, "none")
        weights = str(tmp_path / "random.pt")
        torch.save(clip.state_dict(), weights)
    summary = export_model(model, weights, tmp_path / "repo", precision="fp16", progress=False)
    assert MIN_COSINE <= summary.worst_cosine < 1.0  # half precision: close, not equal
    metadata = ModelMetadata.load(tmp_path / "repo")
    assert metadata.precision == "fp16" and metadata.model_id.endswith("+fp16")
    for tower in (IMAGE_MODEL, TEXT_MODEL):
        module = torch.jit.load(str(tmp_path / "repo" / tower / "1" / "model.pt"))
        dtypes = {p.dtype for p in module.parameters()}
        assert torch.float16 in dtypes, dtypes  # the weights are half
        config = (tmp_path / "repo" / tower / "config.pbtxt").read_text()
        assert metadata.model_id in config  # the identity Triton reports includes +fp16

    reference, _ = load_open_clip(model, weights)
    preprocess = open_clip.image_transform(metadata.image_size, is_train=False)
    tokenizer = open_clip.get_tokenizer(model)
    images = [photo_like(320, 240, seed=s) for s in range(3)]
    with torch.no_grad():
        want_images = reference.encode_image(
            torch.stack([preprocess(i) for i in images]), normalize=True
        ).numpy()
        want_texts = reference.encode_text(tokenizer(TEXTS), normalize=True).numpy()
    async with running_gateway(gateway_settings(tmp_path / "repo")) as gw:
        async with AsyncClipClient(f"127.0.0.1:{gw.port}") as client:
            got_images = (await client.embed_image([encode(i) for i in images])).vectors
            got_texts = (await client.embed_text(TEXTS)).vectors
    for want, got in ((want_images, got_images), (want_texts, got_texts)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert (np.sum(want * got, axis=1) >= MIN_COSINE).all()


def test_fp16_is_refused_for_the_onnx_flavor(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tensorrt"):
        export_model("clip-demo-shapes", "none", tmp_path, flavor="onnx", precision="fp16")
