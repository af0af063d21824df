"""Exported TorchScript + our PIL preprocessing + our tokenizer == open_clip, within 1e-5."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from service.core.image_preprocess import ImageSpec, to_model_pixels
from service.core.text_tokenize import TextTokenizer
from service.model.metadata import ModelMetadata
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration

TOL = 1e-5
TEXTS = [
    "",
    "cat",
    "a photo of a golden retriever playing in the snow",
    "a red circle",
    "一只在雪地里玩耍的金毛猎犬",  # Chinese
    "кошка сидит на подоконнике",  # Cyrillic
    "قطة تجلس على النافذة",  # Arabic
    "🐱🐶🚀 emoji only 🎉",
    "tabs\tand\nnewlines   and\x07control\x00chars",
    "word " * 120,  # far past 77 tokens: truncated
]
MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "1", "YCbCr", "F"]


def _load(model: ExportedModel, tower: str) -> torch.jit.ScriptModule:
    return torch.jit.load(str(model.repository / tower / "1" / "model.pt")).eval()


@functools.cache
def _open_clip_preprocess(name: str) -> Callable[[Image.Image], torch.Tensor]:
    return open_clip.create_model_and_transforms(name, pretrained=None)[2]


def _reference_image(model: ExportedModel, image: Image.Image) -> np.ndarray:
    preprocess = _open_clip_preprocess(model.name)
    with torch.no_grad():
        return model.clip.encode_image(preprocess(image).unsqueeze(0), normalize=True)[0].numpy()


def _ours_image(model: ExportedModel, image: Image.Image) -> np.ndarray:
    meta = ModelMetadata.load(model.repository)
    pixels = to_model_pixels(image, ImageSpec(meta.image_size, meta.interpolation))
    with torch.no_grad():
        return _load(model, "clip_image")(torch.from_numpy(pixels)[None])[0].numpy()


def _images(photos: dict[str, Image.Image]) -> dict[str, Image.Image]:
    astronaut = photos["astronaut"]
    images = dict(photos)
    images.update({f"mode-{m}": astronaut.convert(m) for m in MODES})
    palette = astronaut.convert("P")
    palette.info["transparency"] = 0
    images["palette-transparent"] = palette
    images["1x1"] = astronaut.resize((1, 1))
    images["3x700"] = astronaut.resize((3, 700))
    images["641x479"] = astronaut.resize((641, 479))
    images["64x64"] = astronaut.resize((64, 64))
    return images


@pytest.mark.parametrize("model_fixture", ["demo_model", "vit_model"])
def test_image_embeddings_match_open_clip(
    model_fixture: str, request: pytest.FixtureRequest, photos: dict[str, Image.Image]
) -> None:
    model: ExportedModel = request.getfixturevalue(model_fixture)
    worst = {
        name: float(np.abs(_reference_image(model, im) - _ours_image(model, im)).max())
        for name, im in _images(photos).items()
    }
    assert max(worst.values()) <= TOL, worst


def _pixels_off_by_a_little(image: Image.Image, size: int, how: str) -> np.ndarray:
    """open_clip's resize + crop with one deliberate slip: a crop 1 pixel off, or bilinear
    (`how="none"`: no slip, the same pixels as ours)."""
    if how == "bilinear":
        return to_model_pixels(image, ImageSpec(size, "bilinear"))
    width, height = image.size  # not square: the long side has room to shift the crop
    short = min(width, height)
    new_w, new_h = int(size * width / short), int(size * height / short)
    resized = image.convert("RGB").resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    if how == "crop-shifted-1px":
        left, top = (left + 1, top) if new_w > size else (left, top + 1)
    crop = resized.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1))


@pytest.mark.parametrize("model_fixture", ["demo_model", "vit_model"])
@pytest.mark.parametrize("how", ["crop-shifted-1px", "bilinear"])
def test_parity_check_can_fail(
    model_fixture: str, how: str, request: pytest.FixtureRequest, photos: dict[str, Image.Image]
) -> None:
    """Negative control: preprocessing one small step away from open_clip's is far past TOL."""
    model: ExportedModel = request.getfixturevalue(model_fixture)
    meta = ModelMetadata.load(model.repository)
    assert meta.interpolation == "bicubic"
    image_ts = _load(model, "clip_image")
    for name in ("rocket", "chelsea", "coffee", "china"):
        image = photos[name]
        ours = to_model_pixels(image, ImageSpec(meta.image_size))
        np.testing.assert_array_equal(_pixels_off_by_a_little(image, meta.image_size, "none"), ours)
        pixels = _pixels_off_by_a_little(image, meta.image_size, how)
        assert not np.array_equal(pixels, ours)
        with torch.no_grad():
            slipped = image_ts(torch.from_numpy(pixels)[None])[0].numpy()
        worst = float(np.abs(_reference_image(model, image) - slipped).max())
        print(f"{model.name} {how} {name}: {worst:.2e}")
        assert worst > 10 * TOL, (name, worst)


@pytest.mark.parametrize("model_fixture", ["demo_model", "vit_model"])
def test_text_embeddings_match_open_clip(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    model: ExportedModel = request.getfixturevalue(model_fixture)
    reference_tokens = open_clip.get_tokenizer(model.name)(TEXTS)
    with torch.no_grad():
        want = model.clip.encode_text(reference_tokens, normalize=True).numpy()
    tokenizer = TextTokenizer(77, (8, 16, 24, 32, 48))
    text_ts = _load(model, "clip_text")
    for i, text in enumerate(TEXTS):
        tokens = tokenizer.tokenize(text)
        for length in (len(tokens.ids), tokenizer.bucket_length(len(tokens.ids)), 77):
            ids = torch.from_numpy(tokenizer.pad([tokens], length))
            np.testing.assert_array_equal(ids[0], reference_tokens[i, :length])
            with torch.no_grad():
                got = text_ts(ids)[0].numpy()
            assert np.abs(got - want[i]).max() <= TOL, (text, length)
    assert tokenizer.tokenize(TEXTS[-1]).truncated
    assert not tokenizer.tokenize(TEXTS[2]).truncated


@pytest.mark.parametrize("model_fixture", ["demo_model", "vit_model"])
def test_every_text_length_matches_77_padded(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    """Cutting the padding is exact for every real length 2..77 and for over-long texts."""
    model: ExportedModel = request.getfixturevalue(model_fixture)
    texts = [" ".join(["photo"] * n) for n in range(0, 80)]
    reference_tokens = open_clip.get_tokenizer(model.name)(texts)
    with torch.no_grad():
        want = model.clip.encode_text(reference_tokens, normalize=True)
    lengths = (reference_tokens != 0).sum(dim=1)
    text_ts = _load(model, "clip_text")
    worst = 0.0
    with torch.no_grad():
        for length in sorted(set(lengths.tolist())):
            rows = (lengths == length).nonzero().flatten()
            got = text_ts(reference_tokens[rows, :length])
            worst = max(worst, (got - want[rows]).abs().max().item())
    assert set(lengths.tolist()) >= set(range(2, 78))
    assert worst <= TOL


def test_demo_metadata_describes_the_export(demo_model: ExportedModel) -> None:
    meta = ModelMetadata.load(demo_model.repository)
    assert meta.model_name == "clip-demo-shapes"
    assert meta.embedding_dim == 64 and meta.image_size == 64 and meta.context_length == 77
    assert meta.logit_scale == pytest.approx(
        float(demo_model.clip.logit_scale.detach().exp()), rel=1e-6
    )
    assert len(meta.weights_sha256) == 64
    assert meta.model_id.startswith("clip-demo-shapes/")
