"""HF tokenizers, the family score rules and old repositories, without an exported model.

- `HFTextTokenizer` (the `tokenizers` library on a `tokenizer.json`) gives exactly the rows
  of open_clip's `HFTokenizer` (transformers) for each clean function, with
  `strip_sep_token`, with a pad id other than 0, and flags exactly the texts it cuts;
- its fingerprint changes with anything that changes the ids;
- sigmoid scores are per pair, softmax scores per row;
- a `metadata.json` written before these fields existed still means CLIP BPE + trimming.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.tokenizer import HFTokenizer

from bench.standins import train_tokenizer
from service.core.hf_tokenize import HFTextTokenizer, build_tokenizer
from service.core.scoring import probabilities, sigmoid_scores, softmax_scores
from service.core.text_tokenize import TextTokenizer
from service.model.metadata import ModelMetadata
from tests.support.fakes import model_metadata

TEXTS = [
    "",
    " ",
    "cat",
    "A Photo of a CAT, sitting_on the mat!",
    "un chat assis sur le rebord de la fenêtre",
    "кошка сидит на подоконнике",
    "一只在雪地里玩耍的金毛猎犬",
    "&lt;b&gt;html&lt;/b&gt; and\ttabs\nand    spaces",
    "emoji 🐱🐶 and \x00 control \x07 chars",
    "word " * 60,
]

#: (tokenizer kind, special tokens, template, open_clip HFTokenizer keyword arguments)
STYLES = {
    "siglip": (
        "unigram",
        {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        ("$A </s>", "$A </s> $B </s>"),
        {"clean": "canonicalize"},
    ),
    "bert-strip-sep": (
        "bpe",
        {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"},
        ("[CLS] $A [SEP]", "[CLS] $A [SEP] $B [SEP]"),
        {"clean": "lower", "strip_sep_token": True},
    ),
    "xlm-r": (
        "bpe",
        {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        ("<s> $A </s>", "<s> $A </s> </s> $B </s>"),
        {"clean": "whitespace"},
    ),
}


@pytest.fixture(scope="module", params=sorted(STYLES))
def style(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(open_clip's HFTokenizer, ours) on one trained tokenizer, context 12."""
    kind, specials, template, kwargs = STYLES[request.param]
    directory = train_tokenizer(
        tmp_path_factory.mktemp(request.param), kind=kind, specials=specials, template=template
    )
    reference = HFTokenizer(str(directory), context_length=12, **kwargs)
    hf = reference.tokenizer
    ours = HFTextTokenizer(
        directory / "tokenizer.json",
        12,
        clean=kwargs["clean"],
        pad_token_id=hf.pad_token_id,
        strip_sep_token_id=hf.sep_token_id if kwargs.get("strip_sep_token") else None,
    )
    return reference, ours


def _row(ours: HFTextTokenizer, text: str) -> list[int]:
    return ours.pad([ours.tokenize(text)], ours.context_length)[0].tolist()


def test_rows_equal_open_clip(style) -> None:
    reference, ours = style
    want = reference(TEXTS).tolist()
    assert [_row(ours, t) for t in TEXTS] == want


def test_truncation_flag_is_exact(style) -> None:
    reference, ours = style
    hf = reference.tokenizer
    for text in TEXTS:
        full = hf(reference.clean_fn(text), truncation=False)["input_ids"]
        assert ours.tokenize(text).truncated == (len(full) > 12), text


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=80))
def test_any_text_equals_open_clip(text: str, style) -> None:
    reference, ours = style
    assert _row(ours, text) == reference([text])[0].tolist()


def test_padding_is_full_context_with_the_pad_id(style) -> None:
    reference, ours = style
    tokens = ours.tokenize("cat")
    assert ours.bucket_length(len(tokens.ids)) == 12
    row = ours.pad([tokens], 12)[0]
    assert (row[len(tokens.ids) :] == reference.tokenizer.pad_token_id).all()


def test_fingerprint_changes_with_what_changes_the_ids(tmp_path: Path) -> None:
    kind, specials, template, _ = STYLES["siglip"]
    directory = train_tokenizer(tmp_path / "a", kind=kind, specials=specials, template=template)
    path = directory / "tokenizer.json"
    base = HFTextTokenizer(path, 12).fingerprint
    assert HFTextTokenizer(path, 12).fingerprint == base
    assert HFTextTokenizer(path, 16).fingerprint != base
    assert HFTextTokenizer(path, 12, clean="lower").fingerprint != base
    assert HFTextTokenizer(path, 12, strip_sep_token_id=2).fingerprint != base
    assert HFTextTokenizer(path, 12, pad_token_id=1).fingerprint != base
    other = (
        train_tokenizer(tmp_path / "b", kind="bpe", specials=specials, template=template)
        / "tokenizer.json"
    )
    assert HFTextTokenizer(other, 12).fingerprint != base
    assert not base.startswith("clip-bpe")


def test_old_metadata_is_clip_bpe_with_trimming(tmp_path: Path) -> None:
    """A repository exported before these fields existed serves as it always did."""
    meta = model_metadata()
    meta.save(tmp_path)
    raw = json.loads((tmp_path / "metadata.json").read_text())
    for new in (
        "text_padding",
        "tokenizer_file",
        "tokenizer_clean",
        "pad_token_id",
        "strip_sep_token_id",
        "special_tokens",
        "language",
        "languages",
        "tokenizer",
    ):
        raw.pop(new)
    (tmp_path / "metadata.json").write_text(json.dumps(raw))
    loaded = ModelMetadata.load(tmp_path)
    assert (loaded.tokenizer, loaded.text_padding, loaded.languages) == ("clip-bpe", "trim", ())
    assert loaded.score_function == "softmax"
    tokenizer = build_tokenizer(loaded, (16, 32))
    assert isinstance(tokenizer, TextTokenizer)
    assert tokenizer.buckets == (16, 32, 77)
    assert tokenizer.fingerprint == "clip-bpe/77"


def test_clip_bpe_with_full_padding_has_one_bucket() -> None:
    tokenizer = build_tokenizer(model_metadata(text_padding="full"), (16, 32))
    assert tokenizer.bucket_length(3) == 77


def test_sigmoid_is_per_pair_softmax_per_row() -> None:
    cos = np.array([[0.1, 0.3, -0.2], [0.0, 0.05, 0.9]], dtype=np.float32)
    scale, bias = 10.0, -2.5
    sig = sigmoid_scores(cos, scale, bias)
    want = 1 / (1 + np.exp(-(cos.astype(np.float64) * scale + bias)))
    assert np.abs(sig - want).max() < 1e-7
    # Independent of the other candidates: dropping a column leaves the others unchanged.
    assert np.array_equal(sigmoid_scores(cos[:, :2], scale, bias), sig[:, :2])
    soft = softmax_scores(cos, scale)
    assert np.allclose(soft.sum(axis=1), 1.0)
    assert np.array_equal(probabilities(cos, scale, None), soft)
    assert np.array_equal(probabilities(cos, scale, bias), sig)
    # Large logits neither overflow nor lose the tails.
    extreme = sigmoid_scores(np.array([[1.0, -1.0]]), 1000.0, 0.0)
    assert extreme.tolist() == [[1.0, 0.0]] and np.isfinite(extreme).all()
    assert math.isclose(float(sigmoid_scores(np.zeros((1, 1)), 10.0, 0.0)[0, 0]), 0.5)


def test_score_function_follows_the_logit_bias() -> None:
    assert model_metadata().score_function == "softmax"
    assert model_metadata(logit_bias=-10.0).score_function == "sigmoid"
    assert model_metadata(logit_bias=0.0).score_function == "sigmoid"
