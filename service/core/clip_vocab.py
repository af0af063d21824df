"""open_clip's CLIP BPE tables and text cleaning, without open_clip (whose import loads torch).

The gateway runs without torch, so the parts of `open_clip.tokenizer` (3.3.0) it uses are
here, copied (open_clip took them from openai/CLIP; MIT License, Copyright (c) 2021 OpenAI):
the vocabulary file `bpe_simple_vocab_16e6.txt.gz` (byte for byte open_clip's), the byte ↔
unicode table, the vocabulary and merge ranks built from it, the special tokens, the word
regex, and the three clean functions (also used before HF tokenizers). Only the tables: the
merging itself is `text_tokenize.bpe_merge`. tests/unit/test_clip_vocab.py checks each part
against open_clip's.
"""

from __future__ import annotations

import gzip
import html
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import ftfy
import regex

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
# The number of merges open_clip reads (49,408 ids = 512 byte symbols + merges + 2 specials).
_MERGES = 49152 - 256 - 2


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Each byte → a printable character (BPE never sees whitespace or control bytes)."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@dataclass(frozen=True)
class ClipVocab:
    """The tables of open_clip's `SimpleTokenizer` (default vocabulary, no extra specials)."""

    #: Symbol or merged word piece → id.
    encoder: dict[str, int]
    #: (left, right) → merge rank (lower merges first).
    bpe_ranks: dict[tuple[str, str], int]
    #: UTF-8 byte → the character BPE works on.
    byte_encoder: dict[int, str]
    #: Splits cleaned text into words (special tokens whole, letters, digits one by one, ...).
    pat: regex.Pattern[str]
    sot_token_id: int
    eot_token_id: int


@lru_cache(maxsize=1)
def load_vocab() -> ClipVocab:
    """The tables, read once per process (read-only: every tokenizer shares them)."""
    lines = gzip.decompress(VOCAB_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _MERGES + 1]]
    byte_encoder = bytes_to_unicode()
    vocab = list(byte_encoder.values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += SPECIAL_TOKENS
    encoder = {piece: i for i, piece in enumerate(vocab)}
    pat = regex.compile(
        "|".join(SPECIAL_TOKENS)
        + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    return ClipVocab(
        encoder=encoder,
        bpe_ranks={merge: rank for rank, merge in enumerate(merges)},  # type: ignore[misc]
        byte_encoder=byte_encoder,
        pat=pat,
        sot_token_id=encoder[SPECIAL_TOKENS[0]],
        eot_token_id=encoder[SPECIAL_TOKENS[1]],
    )


def basic_clean(text: str) -> str:
    """ftfy's repairs (mojibake, odd quotes), HTML entities decoded twice, outer spaces cut."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Runs of whitespace become one space."""
    return " ".join(text.split()).strip()


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize_text(text: str) -> str:
    """Lower case, ASCII punctuation removed, underscores as spaces (big_vision's rule)."""
    text = text.replace("_", " ").translate(_NO_PUNCTUATION).lower()
    return " ".join(text.split()).strip()


def _clean_whitespace(text: str) -> str:
    return whitespace_clean(basic_clean(text))


def _clean_lower(text: str) -> str:
    return whitespace_clean(basic_clean(text)).lower()


def _clean_canonicalize(text: str) -> str:
    return canonicalize_text(basic_clean(text))


CLEAN_FUNCTIONS: dict[str, Callable[[str], str]] = {
    "whitespace": _clean_whitespace,
    "lower": _clean_lower,
    "canonicalize": _clean_canonicalize,
}


def clean_function(name: str) -> Callable[[str], str]:
    """open_clip's `get_clean_fn(name)`: "whitespace", "lower" (the CLIP BPE's) or
    "canonicalize"."""
    try:
        return CLEAN_FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown clean function {name!r}; one of {', '.join(CLEAN_FUNCTIONS)}"
        ) from None
