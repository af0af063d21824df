"""`service/core/clip_vocab.py` is open_clip's tokenizer data and cleaning, part for part.

The gateway copies them so that serving never imports open_clip (which imports torch);
here open_clip (installed with the `export` extra) is the reference for each part.
"""

from __future__ import annotations

import hashlib

import open_clip.tokenizer as reference
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.clip_vocab import VOCAB_FILE, clean_function, load_vocab

TRICKY_TEXTS = [
    "",
    "   a  photo\tof\n a CAT   ",
    "schÃ¶n and â€œquotedâ€\x9d mojibake",  # ftfy repairs these
    "&amp;lt;b&amp;gt;twice-escaped&amp;lt;/b&amp;gt; &quot;html&quot; &#39;x&#39;",
    "Under_scores, punctuation!? (and) [brackets] {}",
    "一只在雪地里玩耍的金毛猎犬 Кошка на подоконнике",
    "ﬁ ligature, ＦＵＬＬＷＩＤＴＨ, e\u0301 combining, \u200bzero\u200bwidth",
    "<start_of_text>special<end_of_text> tokens",
]


def test_vocabulary_file_is_open_clips() -> None:
    ours = hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest()
    theirs = hashlib.sha256(open(reference.default_bpe(), "rb").read()).hexdigest()
    assert ours == theirs


def test_tables_equal_simple_tokenizers() -> None:
    vocab = load_vocab()
    simple = reference.SimpleTokenizer()
    assert vocab.encoder == simple.encoder
    assert vocab.bpe_ranks == simple.bpe_ranks
    assert vocab.byte_encoder == simple.byte_encoder
    assert (vocab.sot_token_id, vocab.eot_token_id) == (simple.sot_token_id, simple.eot_token_id)
    assert vocab.pat.pattern == simple.pat.pattern
    assert vocab.pat.flags == simple.pat.flags


@pytest.mark.parametrize("name", ["whitespace", "lower", "canonicalize"])
@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_clean_functions_equal_open_clips(name: str, text: str) -> None:
    assert clean_function(name)(text) == reference.get_clean_fn(name)(text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=60), name=st.sampled_from(["whitespace", "lower", "canonicalize"]))
def test_clean_functions_equal_open_clips_on_any_text(text: str, name: str) -> None:
    assert clean_function(name)(text) == reference.get_clean_fn(name)(text)


def test_an_unknown_clean_function_is_named() -> None:
    with pytest.raises(ValueError, match=r"'upper'.*whitespace, lower, canonicalize"):
        clean_function("upper")
