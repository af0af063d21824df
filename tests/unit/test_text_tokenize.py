"""TextTokenizer: ids identical to open_clip's, O(n log n) BPE per word, a bounded word cache."""

from __future__ import annotations

import random
import string
from functools import cache
from types import SimpleNamespace

import open_clip
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from open_clip.tokenizer import SimpleTokenizer

from service.core.text_tokenize import (
    CACHED_WORD_MAX_CHARS,
    END_OF_WORD,
    WORD_CACHE_SIZE,
    TextTokenizer,
    bpe_merge,
)

REFERENCE = open_clip.get_tokenizer("ViT-B-32")
LONG = 20_000  # a context length no test text reaches: compares whole bodies, not a prefix

_rng = random.Random(13)
_COMMON_HAN = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着"
LONG_WORDS = {
    "a*10000": "a" * 10_000,
    "ab*5000": "ab" * 5_000,
    "aab*3333": "aab" * 3_333,
    "random-letters-10000": "".join(_rng.choices(string.ascii_lowercase, k=10_000)),
    "random-mixed-case-10000": "".join(_rng.choices(string.ascii_letters, k=10_000)),
    "han-3000": "".join(chr(_rng.randint(0x4E00, 0x9FFF)) for _ in range(3_000)),
    "common-han-3000": "".join(_rng.choices(_COMMON_HAN, k=3_000)),
    "hangul-3000": "".join(chr(_rng.randint(0xAC00, 0xD7A3)) for _ in range(3_000)),
    "same-han-3000": "中" * 3_000,
    "punctuation-5000": "!?" * 2_500,
}
SHORT_TEXTS = [
    "",
    "   ",
    "a",
    "a photo of a cat",
    "A Photo Of A CAT!!!",
    # emoji, ZWJ sequences, flags, skin tones
    "😀🎉 party 👩‍👩‍👧‍👦 🇫🇷🇯🇵 👍🏽",
    "😀" * 40,
    # mixed scripts
    "Привет мир hello 世界 مرحبا שלום γειά σου नमस्ते こんにちは 안녕하세요",
    "東京タワーTokyo2024年",
    # accents, composed and decomposed
    "naïve café Ångström résumé Øresund œuvre straße",
    "e\u0301te\u0301 cafe\u0301",
    # whitespace, html entities, mojibake, invisible and compatibility characters (ftfy)
    "  \t\n hello\u00a0world \r\n ",
    "&amp;lt;b&amp;gt;bold&lt;/b&gt; &quot;q&quot;",
    "Ã©tÃ© cafÃ©",
    "zero\u200bwidth soft\u00adhyphen",
    "It\u2019s \u201cquoted\u201d \u2014 dash",
    "ＦＵＬＬＷＩＤＴＨ ＡＢＣ １２３",
    "\x00\x01\x7f control \ufffd",
    # the regex's contractions, digits and punctuation runs
    "can't won't it's we'll they've I'm he'd you're",
    "1234567890 3.14159 1,000,000",
    "!!!???... --- *** ### @@@ $$$",
    # open_clip's special tokens, which it keeps whole
    "<start_of_text> hi <END_OF_TEXT>!",
    "<<start_of_text>> x<end_of_text>y",
]


def reference_ids(texts: list[str], context_length: int = 77) -> list[tuple[int, ...]]:
    """open_clip's ids without the padding (its last real id is end-of-text, never 0)."""
    rows = REFERENCE(texts, context_length=context_length).tolist()
    out = []
    for row in rows:
        while row[-1] == 0:
            row.pop()
        out.append(tuple(row))
    return out


@cache
def tokenizer(context_length: int) -> TextTokenizer:
    return TextTokenizer(context_length)


def assert_same_as_open_clip(texts: list[str], context_length: int) -> None:
    want = reference_ids(texts, context_length)
    body_len = [len(REFERENCE.encode(text)) for text in texts]
    for text, ids, n in zip(texts, want, body_len, strict=True):
        got = tokenizer(context_length).tokenize(text)
        assert got.ids == ids, (text[:80], context_length)
        assert got.truncated == (n > context_length - 2), (text[:80], context_length)


@pytest.mark.parametrize("name", list(LONG_WORDS))
def test_long_words_match_open_clip(name: str) -> None:
    assert_same_as_open_clip([LONG_WORDS[name]], LONG)
    assert_same_as_open_clip([LONG_WORDS[name]], 77)


@pytest.mark.parametrize("context_length", [77, 16, LONG])
def test_short_texts_match_open_clip(context_length: int) -> None:
    assert_same_as_open_clip(SHORT_TEXTS, context_length)


def test_truncation_edge() -> None:
    """75 body ids fit in 77; 76 do not; a multi-token word may straddle the edge."""
    texts = [" ".join(["photo"] * n) for n in range(70, 81)]
    for n_before in range(70, 77):  # "photo"s then a word of several tokens
        texts.append(" ".join(["photo"] * n_before) + " antidisestablishmentarianism")
        texts.append(" ".join(["photo"] * n_before) + " 😀🎉")
    assert_same_as_open_clip(texts, 77)
    tok = tokenizer(77)
    for n in range(70, 81):
        got = tok.tokenize(" ".join(["photo"] * n))
        assert len(got.ids) == min(n, 75) + 2
        assert got.truncated == (n > 75)
        assert got.ids[-1] == REFERENCE.eot_token_id


# Small alphabets make repetitive words, so many rounds merge many occurrences at once.
_SMALL_ALPHABETS = ["ab", "aab ", "abc", "a", "xyz!", "ab中", "日本語 ", "😀a", "ñn~", "e\u0301 "]
_TEXTS = st.one_of(
    st.text(max_size=300),
    st.sampled_from(_SMALL_ALPHABETS).flatmap(lambda a: st.text(alphabet=a, max_size=400)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_TEXTS, context_length=st.sampled_from([8, 77, LONG]))
def test_random_text_matches_open_clip(text: str, context_length: int) -> None:
    assert_same_as_open_clip([text], context_length)


# -- the merge procedure itself, against open_clip's `bpe` on made-up rank tables --------------


def open_clip_bpe(token: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """open_clip's own `SimpleTokenizer.bpe` run with another rank table, uncached."""
    stub = SimpleNamespace(bpe_ranks=ranks, cache={})
    return SimpleTokenizer.bpe(stub, token).split(" ")  # type: ignore[arg-type]


def symbols_of(token: str) -> list[str]:
    return [*token[:-1], token[-1] + END_OF_WORD]


def test_lower_rank_pair_made_in_a_round_waits_for_the_next_round() -> None:
    """x a b a b y: (a, b) merges both occurrences first, though (ab, a) ranks lower.

    Merging one occurrence at a time from a heap would make x ab a b y, then (ab, a) would win.
    """
    ranks = {("a", "b"): 1, ("ab", "a"): 0}
    want = ["x", "ab", "ab", "y" + END_OF_WORD]
    assert open_clip_bpe("xababy", ranks) == want
    assert bpe_merge(symbols_of("xababy"), ranks) == want


def test_overlapping_occurrences_merge_left_to_right() -> None:
    ranks = {("a", "a"): 0, ("aa", "a"): 1}
    for token in ["aab", "aaab", "aaaab", "aaaaab", "a" * 7 + "b"]:
        assert bpe_merge(symbols_of(token), ranks) == open_clip_bpe(token, ranks)


@st.composite
def _rank_tables(draw: st.DrawFn) -> dict[tuple[str, str], int]:
    """Random merges over "abc": each joins two symbols already known, as CLIP's merges do."""
    vocab = ["a", "b", "c"]
    vocab += [v + END_OF_WORD for v in vocab]
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(draw(st.integers(0, 25))):
        left = draw(st.sampled_from([v for v in vocab if not v.endswith(END_OF_WORD)]))
        right = draw(st.sampled_from(vocab))
        if (left, right) not in ranks:
            ranks[(left, right)] = len(ranks)
            vocab.append(left + right)
    # Shuffle the ranks: merged pairs may then rank below the pairs that made their parts.
    order = draw(st.permutations(range(len(ranks))))
    return {pair: order[rank] for pair, rank in ranks.items()}


@settings(max_examples=500, deadline=None)
@given(ranks=_rank_tables(), token=st.text(alphabet="abc", min_size=1, max_size=40))
def test_merges_match_open_clip_on_random_rank_tables(
    ranks: dict[tuple[str, str], int], token: str
) -> None:
    assert bpe_merge(symbols_of(token), ranks) == open_clip_bpe(token, ranks)


# -- cost --------------------------------------------------------------------------------------


class CountingRanks(dict):
    """The rank table, counting lookups: one per pair examined, the unit of BPE work."""

    lookups = 0

    def get(self, key, default=None):  # type: ignore[no-untyped-def]
        self.lookups += 1
        return super().get(key, default)


def rank_lookups(word: str, old: bool = False) -> int:
    """Lookups to merge `word` with CLIP's ranks: here, or (`old`) in open_clip's `bpe`."""
    ranks = CountingRanks(REFERENCE.bpe_ranks)
    if old:
        SimpleTokenizer.bpe(SimpleNamespace(bpe_ranks=ranks, cache={}), word)  # type: ignore[arg-type]
    else:
        bpe_merge(symbols_of(word), ranks)
    return ranks.lookups


def random_letters(n: int, seed: int) -> str:
    return "".join(random.Random(seed).choices(string.ascii_lowercase, k=n))


@pytest.mark.parametrize("name", list(LONG_WORDS))
def test_pair_lookups_are_linear_in_word_length(name: str) -> None:
    """At most 6 lookups per symbol (n initial pairs, ≤ 3n pops, ≤ 2 per merge): counted, not
    timed, so no machine is too slow for it. Heap work is one push or pop per lookup at most."""
    tok = tokenizer(77)
    word = "".join(tok._byte_encoder[b] for b in LONG_WORDS[name].encode("utf-8"))
    assert rank_lookups(word) <= 6 * len(word)


def test_pair_lookups_grow_linearly_where_open_clip_grows_quadratically() -> None:
    small, large = random_letters(1_000, 1), random_letters(8_000, 2)
    ratio = rank_lookups(large) / rank_lookups(small)
    assert 6 < ratio < 10  # 8× the letters: ~8× the work (quadratic would be ~64×)
    # The same count for open_clip's `bpe` (one lookup per pair per round), on 2,000 letters.
    word = random_letters(2_000, 3)
    assert rank_lookups(word, old=True) > 50 * rank_lookups(word)


def test_ten_thousand_letter_words_cost_tokenize_linear_work() -> None:
    """`tokenize` itself, not only `bpe_merge`, does linear BPE work on 10,000-letter words.

    Counted, not timed (a time bound either fails on a loaded machine or is too loose to
    catch open_clip's ~2 s per word on a fast one): the tokenizer's rank table counts (it
    is the only one: open_clip's `SimpleTokenizer` is not used), and the count must be that
    of one merge per word: at least one lookup per initial pair, at most 6 per symbol."""
    tok = TextTokenizer(77)  # fresh: nothing cached
    ranks = CountingRanks(tok._ranks)
    tok._ranks = ranks
    for seed in range(3):
        word = random_letters(10_000, 100 + seed)
        before = ranks.lookups
        assert tok.tokenize(word).truncated  # the whole word merged, then cut
        assert len(word) - 1 <= ranks.lookups - before <= 6 * len(word)


def test_word_cache_stays_bounded() -> None:
    tok = TextTokenizer(100_000)
    letters = string.ascii_lowercase
    words = [
        "".join(letters[(i // 26**k) % 26] for k in range(4)) + "x" * (i % 7) for i in range(50_000)
    ]
    assert len(set(words)) == 50_000
    for start in range(0, len(words), 1_000):
        tok.tokenize(" ".join(words[start : start + 1_000]))
    info = tok._cached_word_ids.cache_info()
    assert info.maxsize == WORD_CACHE_SIZE
    assert info.currsize <= WORD_CACHE_SIZE
    # Long words are not cached at all.
    tok.tokenize("a" * (CACHED_WORD_MAX_CHARS + 1))
    tok.tokenize("b" * (CACHED_WORD_MAX_CHARS + 1))
    assert tok._cached_word_ids.cache_info().currsize == info.currsize


def test_cached_and_uncached_words_agree() -> None:
    tok = TextTokenizer(77)
    text = "photo of a cat, " * 3 + "a" * (CACHED_WORD_MAX_CHARS + 5)
    first = tok.tokenize(text)
    assert tok.tokenize(text) == first  # second time from the cache
    assert first.ids == reference_ids([text])[0]


def test_open_clip_bpe_is_never_called(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [*SHORT_TEXTS, LONG_WORDS["ab*5000"], LONG_WORDS["common-han-3000"]]
    want = reference_ids(texts)

    def quadratic(self: SimpleTokenizer, token: str) -> str:
        raise AssertionError("open_clip's quadratic bpe was called")

    monkeypatch.setattr(SimpleTokenizer, "bpe", quadratic)
    tok = TextTokenizer(77)
    assert [tok.tokenize(text).ids for text in texts] == want
