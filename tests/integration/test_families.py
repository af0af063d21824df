"""Every open_clip family end to end: export → serve over real gRPC → open_clip's numbers.

One tiny representative per family (`tests/support/families.py`, random weights, HF
tokenizers and HF text configs built here, no hub): CLIP, CLIPA (CLIP's tower with BERT's
tokenizer, [SEP] stripped, `last` pooling), MetaCLIP 2 worldwide (CLIP's tower, mT5-style
tokenizer, `eos` pooling), SigLIP (HF tokenizer, fixed context, `last` pooling, logit
bias → sigmoid scores), EVA (CustomTextCLIP with open_clip's
causal text tower: trimmed padding), MobileCLIP (text tower without causal mask: full
padding), XLM-R (HF text tower with a padding mask), NLLB (HF tower that takes a
language), CoCa (appended class token, `(pooled, tokens)` towers). The onnx flavor and a
real tritonserver are checked on the SigLIP-style family (and onnx on XLM-R).

Checked for each: the gateway's token ids equal `open_clip.get_tokenizer(model)(texts)`;
text and image vectors equal open_clip's within 1e-5; Similarity and Classify
probabilities follow the family's rule; GetModelInfo names it; a `language` is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import open_clip
import openai
import pytest
import torch
from PIL import Image

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.core.hf_tokenize import build_tokenizer
from service.model.export import export_model, load_open_clip, resolve_model_name
from service.model.metadata import ModelMetadata
from service.processes.gateway import gateway_settings, running_gateway
from tests.support.families import FAMILIES, write_family
from tests.support.http_json import http_json
from tests.support.triton import start_triton

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.integration

TOL = 1e-5
TEXTS = [
    "",
    "cat",
    "a photo of a dog sitting on the grass",
    "A Diagram of a RED circle, beside a blue_square!",
    "一只在雪地里玩耍的金毛猎犬",
    "кошка сидит на подоконнике",
    "tabs\tand\nnewlines   and <b>html</b> &amp; entities",
    "word " * 120,  # past every context length: truncated
]


@dataclass(frozen=True)
class Family:
    """A family's tiny model in memory and its exported repository."""

    family: str
    name: str
    clip: torch.nn.Module
    repository: Path


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Exported from a checkpoint of random weights (scale and bias set so scores are
    neither 0 nor 1), the same weights loaded by open_clip beside it."""
    return _export_family(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def nllb(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """The NLLB-style family alone (its text tower takes a language)."""
    return _export_family("nllb", tmp_path_factory)


@pytest.fixture(scope="module", params=["siglip", "xlm-roberta"])
def onnx_family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Full-padding HF-tokenizer families in the onnx flavor (ONNX Runtime in the gateway):
    a timm image tower with SigLIP's text tower, and a HF (XLM-R) text tower."""
    return _export_family(request.param, tmp_path_factory, flavor="onnx")


@pytest.fixture(scope="module")
def siglip_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Family, str]]:
    """The SigLIP-style family (python flavor) served by a real tritonserver: (model, url)."""
    model = _export_family("siglip", tmp_path_factory)
    with start_triton(model.repository, workdir=tmp_path_factory.mktemp("triton")) as triton:
        yield model, triton.grpc_url


def _export_family(
    name: str, tmp_path_factory: pytest.TempPathFactory, flavor: str = "python"
) -> Family:
    directory = tmp_path_factory.mktemp(f"family-{name}")
    config = write_family(name, directory / "config")
    torch.manual_seed(7)
    clip, _ = load_open_clip(str(config), "none")
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(10.0))
        if getattr(clip, "logit_bias", None) is not None:
            clip.logit_bias.fill_(0.3)
    checkpoint = directory / "weights.pt"
    torch.save(clip.state_dict(), checkpoint)
    export_model(str(config), str(checkpoint), directory / "repo", flavor=flavor, progress=False)
    loaded, _ = load_open_clip(str(config), str(checkpoint))
    return Family(name, resolve_model_name(str(config)), loaded, directory / "repo")


@contextlib.asynccontextmanager
async def serving(
    repository: Path, **settings: Any
) -> AsyncIterator[clip_pb2_grpc.ClipServiceStub]:
    """A gateway (embedded unless `settings` say otherwise) on free loopback ports, once
    SERVING, and a stub on a channel to it."""
    async with (
        running_gateway(gateway_settings(repository, **settings)) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        yield clip_pb2_grpc.ClipServiceStub(channel)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _images() -> list[bytes]:
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())
    return [
        _png(astronaut),
        _png(Image.fromarray(data.chelsea()).resize((300, 200))),
        _png(Image.fromarray(data.camera())),  # grayscale
        _png(astronaut.resize((41, 97))),
    ]


def _reference_texts(model: Family, texts: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    tokens = open_clip.get_tokenizer(model.name)(texts)
    with torch.no_grad():
        return tokens, model.clip.encode_text(tokens, normalize=True).numpy()


def _reference_images(model: Family, blobs: list[bytes]) -> np.ndarray:
    _, _, preprocess = open_clip.create_model_and_transforms(
        model.name, pretrained=None, pretrained_text=False
    )
    batch = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in blobs])
    with torch.no_grad():
        return model.clip.encode_image(batch, normalize=True).numpy()


def _reference_probabilities(model: Family, cos: np.ndarray) -> np.ndarray:
    """open_clip's own rule: sigmoid(scale·cos + bias) per pair with a bias, else softmax."""
    logits = torch.from_numpy(cos).double() * model.clip.logit_scale.detach().exp().double()
    bias = getattr(model.clip, "logit_bias", None)
    if bias is not None:
        return torch.sigmoid(logits + bias.detach().double()).numpy()
    return logits.softmax(dim=-1).numpy()


def _cut(model: Family, texts: list[str]) -> list[bool]:
    """Whether open_clip cuts each text: its untruncated ids are more than the context."""
    metadata = ModelMetadata.load(model.repository)
    tokenizer = open_clip.get_tokenizer(model.name)
    if isinstance(tokenizer, open_clip.tokenizer.HFTokenizer):
        hf = tokenizer.tokenizer
        lengths = [len(hf(tokenizer.clean_fn(t), truncation=False)["input_ids"]) for t in texts]
    else:
        long = open_clip.get_tokenizer(model.name, context_length=4096)(texts)
        lengths = (long != 0).sum(dim=1).tolist()
    return [n > metadata.context_length for n in lengths]


def _vectors(answer: clip_pb2.EmbedResponse) -> np.ndarray:
    return np.stack([np.asarray(e.values, dtype=np.float32) for e in answer.embeddings])


def test_gateway_token_ids_equal_open_clip(family: Family) -> None:
    metadata = ModelMetadata.load(family.repository)
    tokenizer = build_tokenizer(metadata, (8, 16, 32))
    want = open_clip.get_tokenizer(family.name)(TEXTS)
    cut = _cut(family, TEXTS)
    assert cut[1] is False and cut[-1] is True
    for text, row, was_cut in zip(TEXTS, want.tolist(), cut, strict=True):
        tokens = tokenizer.tokenize(text)
        assert tokenizer.pad([tokens], metadata.context_length)[0].tolist() == row, text
        assert tokens.truncated == was_cut, text
        # What the gateway sends: the bucket edge (trim) or the full context (full).
        length = tokenizer.bucket_length(len(tokens.ids))
        if metadata.text_padding == "full":
            assert length == metadata.context_length
        assert tokenizer.pad([tokens], length)[0].tolist() == row[:length]
    hf_families = ("clipa", "worldwide", "siglip", "xlm-roberta", "nllb")
    expected_kind = "hf" if family.family in hf_families else "clip-bpe"
    assert metadata.tokenizer == expected_kind
    if expected_kind == "hf":
        assert (family.repository / metadata.tokenizer_file).is_file()


def test_padding_rule_is_the_family_s(family: Family) -> None:
    """Causal towers pooling at end-of-text (argmax) trim; fixed-position and masked towers
    get the full context (SigLIP's and CLIPA's `last`, MetaCLIP 2's `eos`, MobileCLIP's
    unmasked tower, HF, CoCa's class token)."""
    metadata = ModelMetadata.load(family.repository)
    trims = family.family in ("clip", "eva")
    assert metadata.text_padding == ("trim" if trims else "full")


async def test_served_vectors_and_scores_match_open_clip(family: Family) -> None:
    await _assert_served_like_open_clip(family)


async def test_onnx_flavor_matches_open_clip(onnx_family: Family) -> None:
    """The onnx flavor of full-padding HF-tokenizer families, run by ONNX Runtime."""
    assert ModelMetadata.load(onnx_family.repository).flavor == "onnx"
    await _assert_served_like_open_clip(onnx_family)


async def test_triton_serves_a_siglip_family_like_open_clip(
    siglip_triton: tuple[Family, str],
) -> None:
    """Gateway → real tritonserver (python backend): the fixed-length text input config,
    tokenizer from the repository, sigmoid scores."""
    model, url = siglip_triton
    await _assert_served_like_open_clip(model, backend="triton", triton_url=url)


async def _assert_served_like_open_clip(family: Family, **settings: Any) -> None:
    blobs = _images()
    _, want_text = _reference_texts(family, TEXTS)
    want_image = _reference_images(family, blobs)
    labels = ["cat", "astronaut", "a diagram", "coffee"]
    async with serving(family.repository, **settings) as stub:
        texts = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=TEXTS))
        alone = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=TEXTS[2:3]))
        images = await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=blobs))
        similarity = await stub.Similarity(
            clip_pb2.SimilarityRequest(
                queries=[clip_pb2.Item(image=b) for b in blobs],
                candidates=[clip_pb2.Item(text=t) for t in labels],
            )
        )
        classify = await stub.Classify(
            clip_pb2.ClassifyRequest(images=blobs[:2], labels=labels, templates=["{}"])
        )
        info = await stub.GetModelInfo(clip_pb2.GetModelInfoRequest())
        # A model without languages refuses any; one with languages an unknown one.
        language = "xxx_Fake" if family.family == "nllb" else "fra_Latn"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=["chat"], language=language))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "language" in (refused.value.details() or "")

    got_text = _vectors(texts)
    assert np.abs(got_text - want_text).max() <= TOL
    assert np.abs(_vectors(alone)[0] - want_text[2]).max() <= TOL
    assert [e.truncated for e in texts.embeddings] == _cut(family, TEXTS)
    assert np.abs(_vectors(images) - want_image).max() <= TOL

    _, want_labels = _reference_texts(family, labels)
    cos = want_image @ want_labels.T
    want_probs = _reference_probabilities(family, cos)
    got_scores = np.array([list(r.scores) for r in similarity.rows])
    got_probs = np.array([list(r.probabilities) for r in similarity.rows])
    assert np.abs(got_scores - cos).max() <= TOL
    assert np.abs(got_probs - want_probs).max() <= TOL
    for row, ranked in enumerate(classify.results):
        by_label = {s.label: s.probability for s in ranked.labels}
        assert [by_label[label] for label in labels] == pytest.approx(
            list(want_probs[row]), abs=TOL
        )

    bias = getattr(family.clip, "logit_bias", None)
    if bias is None:
        assert info.score_function == "softmax"
        assert info.logit_bias == 0.0
        assert got_probs.sum(axis=1) == pytest.approx(1.0, abs=1e-5)
    else:
        assert info.score_function == "sigmoid"
        assert info.logit_bias == pytest.approx(0.3)
        # Independent per pair: not normalised over the labels.
        assert abs(float(got_probs.sum(axis=1).max()) - 1.0) > 0.1
    assert info.logit_scale == pytest.approx(10.0, rel=1e-6)
    assert list(info.languages) == list(ModelMetadata.load(family.repository).languages)
    assert bool(info.languages) == (family.family == "nllb")
    assert info.tokenizer == ModelMetadata.load(family.repository).tokenizer


async def test_language_picks_the_tower_s_language_token(nllb: Family) -> None:
    """NLLB reads the source language from its first token: a request's `language` gives
    the ids (and vectors) of transformers' tokenizer with that `src_lang`; none: the
    exported default; Classify and Similarity take it too."""
    hf = open_clip.get_tokenizer(nllb.name)
    texts = ["un chat assis sur le rebord de la fenêtre", "a cat"]
    default = hf(texts)
    hf.tokenizer.src_lang = "fra_Latn"  # open_clip's set_language is a no-op on transformers 5
    french = hf(texts)
    assert not torch.equal(default[:, 0], french[:, 0])
    with torch.no_grad():
        want_default = nllb.clip.encode_text(default, normalize=True).numpy()
        want_french = nllb.clip.encode_text(french, normalize=True).numpy()
    async with serving(nllb.repository) as stub:
        got_default = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts))
        got_french = await stub.EmbedText(
            clip_pb2.EmbedTextRequest(texts=texts, language="fra_Latn")
        )
        info = await stub.GetModelInfo(clip_pb2.GetModelInfoRequest())
        similarity = await stub.Similarity(
            clip_pb2.SimilarityRequest(
                queries=[clip_pb2.Item(text=texts[0])],
                candidates=[clip_pb2.Item(text=texts[1])],
                language="fra_Latn",
            )
        )
    assert np.abs(_vectors(got_default) - want_default).max() <= TOL
    assert np.abs(_vectors(got_french) - want_french).max() <= TOL
    assert info.default_language == "eng_Latn"
    assert "fra_Latn" in info.languages
    assert similarity.rows[0].scores[0] == pytest.approx(
        float(want_french[0] @ want_french[1]), abs=TOL
    )


async def test_the_http_api_takes_the_language_too(nllb: Family) -> None:
    """`language` in a `/v1/embeddings` or `/v1/similarity` body does what it does on gRPC;
    an unknown one is a 400 naming the field."""
    hf = open_clip.get_tokenizer(nllb.name)
    hf.tokenizer.src_lang = "fra_Latn"
    texts = ["un chat assis sur le rebord de la fenêtre", "a cat"]
    with torch.no_grad():
        want = nllb.clip.encode_text(hf(texts), normalize=True).numpy()
    async with running_gateway(gateway_settings(nllb.repository)) as gateway:
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{gateway.http_port}/v1", api_key="x", max_retries=0
        )
        async with client:
            answer = await client.embeddings.create(
                model="clip",
                input=texts,
                encoding_format="float",
                extra_body={"language": "fra_Latn"},
            )
            with pytest.raises(openai.BadRequestError, match="language"):
                await client.embeddings.create(
                    model="clip", input=texts, extra_body={"language": "xxx_Fake"}
                )
        body = {"queries": [texts[0]], "candidates": [texts[1]], "language": "fra_Latn"}
        status, similarity = await asyncio.to_thread(
            http_json, gateway.http_port, "/v1/similarity", body
        )
    assert status == 200, similarity
    got = np.array([d.embedding for d in answer.data], dtype=np.float32)
    assert np.abs(got - want).max() <= TOL
    assert similarity["rows"][0]["scores"][0] == pytest.approx(float(want[0] @ want[1]), abs=TOL)


async def test_two_hf_tokenizer_models_share_a_repository(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Two families with their own HF tokenizers exported as two names into one `--out`:
    each keeps its tokenizer (`NAME_text/tokenizer/`), and each serves its own token ids."""
    repository = tmp_path_factory.mktemp("two-hf") / "repo"
    names = {"siglip": "clip", "xlm-roberta": "multilingual"}
    models = {}
    for family, served_as in names.items():
        directory = tmp_path_factory.mktemp(f"two-{family}")
        config = write_family(family, directory / "config")
        torch.manual_seed(11)
        clip, _ = load_open_clip(str(config), "none")
        checkpoint = directory / "weights.pt"
        torch.save(clip.state_dict(), checkpoint)
        export_model(str(config), str(checkpoint), repository, progress=False, name=served_as)
        models[served_as] = resolve_model_name(str(config))
    for served_as, model_name in models.items():
        metadata = ModelMetadata.load(repository, served_as)
        assert metadata.tokenizer_file.startswith(f"{served_as}_text/tokenizer/")
        tokenizer = build_tokenizer(metadata, (8, 16, 32))
        want = open_clip.get_tokenizer(model_name)(TEXTS)
        for text, row in zip(TEXTS, want.tolist(), strict=True):
            got = tokenizer.pad([tokenizer.tokenize(text)], metadata.context_length)[0]
            assert got.tolist() == row, (served_as, text)
    async with serving(repository) as stub:
        listed = await stub.ListModels(clip_pb2.ListModelsRequest(), timeout=30)
        assert sorted(m.name for m in listed.models) == ["clip", "multilingual"]
        assert {m.name: m.score_function for m in listed.models} == {
            "clip": "sigmoid",
            "multilingual": "softmax",
        }
