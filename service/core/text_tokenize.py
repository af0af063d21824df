"""Where text becomes token ids: CLIP's BPE, truncation flag, length buckets.

Contract:

- Ids are exactly those of `open_clip.tokenize` / `open_clip.get_tokenizer("ViT-B-32")`
  (same cleaning, word regex, byte encoding, vocabulary and merges, taken from open_clip's
  `SimpleTokenizer` into `clip_vocab`, so that serving loads no torch), without the
  padding, and cut the same way: at most `context_length` ids, end-of-text last.
- Cost: O(n log n) in the length n of each word, and the word cache is bounded, so no text
  can stall the caller or grow the process.

Why not call open_clip's `SimpleTokenizer.bpe`: each of its rounds scans every pair of the
word and rebuilds it, so a word costs O(n²) (one regex "word" can be a 10,000-letter string,
or thousands of CJK characters with no spaces, i.e. ~9,000 byte symbols), and its cache is a
dict that never evicts, so unique words grow it without bound. `bpe_merge` below makes the
same merges with a heap over a linked list of symbols, and `TextTokenizer` keeps a bounded
LRU of short words only.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from service.core.clip_vocab import SPECIAL_TOKENS, clean_function, load_vocab

END_OF_WORD = "</w>"
# Words (byte-encoded) up to this many symbols are cached; longer ones are rare in real text
# and would let a caller fill the cache with large keys. At most WORD_CACHE_SIZE entries of
# ≤ CACHED_WORD_MAX_CHARS symbols and ids: a few MB at worst.
WORD_CACHE_SIZE = 4096
CACHED_WORD_MAX_CHARS = 64


def bpe_merge(symbols: Sequence[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """The symbols open_clip's `SimpleTokenizer.bpe` ends with, in O(n log n).

    open_clip repeats rounds: take the lowest-rank pair (first, second) among the current
    adjacent symbols, and merge all its non-overlapping occurrences left to right. Pairs
    created by a round only compete from the next round on, even when their rank is lower
    (so merging one occurrence at a time from a heap would differ).

    Here: a doubly linked list of symbols (indexed by original position; a merge keeps the
    left position) and a heap of (rank, left position) holding every current ranked pair,
    plus stale entries that are checked on pop. A round pops every entry of the minimum
    rank, keeps those whose pair is still current, merges them left to right (skipping a
    start already absorbed by its left neighbour's merge, the overlap case first == second),
    and only then pushes the pairs the merges made. Ranks are unique per pair, so one rank is
    one (first, second). Each merge pushes at most 2 entries, so there are at most 3n pushes
    and pops and 6n rank lookups.
    """
    n = len(symbols)
    if n < 2:
        return list(symbols)
    rank_of = ranks.get
    sym: list[str | None] = list(symbols)
    nxt = [*range(1, n), -1]
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        rank = rank_of((symbols[i], symbols[i + 1]))
        if rank is not None:
            heap.append((rank, i))
    heapq.heapify(heap)
    while heap:
        rank = heap[0][0]
        starts = set()
        while heap and heap[0][0] == rank:
            i = heapq.heappop(heap)[1]
            left = sym[i]
            j = nxt[i]
            if left is not None and j != -1 and rank_of((left, sym[j])) == rank:
                starts.add(i)
        merged = []
        for i in sorted(starts):
            if sym[i] is None:  # absorbed as the right half of the previous merge
                continue
            j = nxt[i]
            sym[i] = sym[i] + sym[j]  # type: ignore[operator]
            sym[j] = None
            k = nxt[j]
            nxt[i] = k
            if k != -1:
                prv[k] = i
            merged.append(i)
        for i in merged:
            h = prv[i]
            if h != -1:
                pair_rank = rank_of((sym[h], sym[i]))
                if pair_rank is not None:
                    heapq.heappush(heap, (pair_rank, h))
            k = nxt[i]
            if k != -1:
                pair_rank = rank_of((sym[i], sym[k]))
                if pair_rank is not None:
                    heapq.heappush(heap, (pair_rank, i))
    out = []
    i = 0  # position 0 is never absorbed: it has no left neighbour
    while i != -1:
        out.append(sym[i])
        i = nxt[i]
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Tokens:
    """One text's ids: [start, ..., end] (≤ context length) and whether it was cut."""

    ids: tuple[int, ...]
    truncated: bool


def length_buckets(context_length: int, edges: Sequence[int] = ()) -> tuple[int, ...]:
    """Padded lengths a text may get: the `edges` below the context length (at least 2, the
    start and end tokens), then the context length itself."""
    below = sorted({int(e) for e in edges if 2 <= int(e) < context_length})
    return (*below, context_length)


def bucket_for(buckets: Sequence[int], n_tokens: int) -> int:
    """The padded length for a text of `n_tokens` ids: the next bucket edge."""
    return buckets[bisect_left(buckets, n_tokens)]


def pad_rows(batch: Sequence[Tokens], length: int, pad_id: int = 0) -> np.ndarray:
    """`int64 [B, length]`: each row's ids, then `pad_id` (open_clip's CLIP BPE pads with 0)."""
    out = np.full((len(batch), length), pad_id, dtype=np.int64)
    for row, tokens in enumerate(batch):
        out[row, : len(tokens.ids)] = tokens.ids
    return out


class TextTokenizer:
    """open_clip's tokenizer with the same truncation, plus padding to length buckets."""

    def __init__(self, context_length: int, buckets: Sequence[int] = ()):
        self.context_length = context_length
        # open_clip's tables (vocabulary, merge ranks, regex), copied without open_clip.
        self._vocab = load_vocab()
        self._encoder: dict[str, int] = self._vocab.encoder
        self._ranks: Mapping[tuple[str, str], int] = self._vocab.bpe_ranks
        self._byte_encoder: dict[int, str] = self._vocab.byte_encoder
        self._clean = clean_function("lower")  # what open_clip's SimpleTokenizer applies
        # open_clip's cache starts with the special tokens mapped to themselves: the regex
        # matches them whole and they encode as their own ids, without an end-of-word mark.
        self._special = {t: (self._encoder[t],) for t in SPECIAL_TOKENS}
        self._cached_word_ids = lru_cache(maxsize=WORD_CACHE_SIZE)(self._encode_word)
        self._sot = self._vocab.sot_token_id
        self._eot = self._vocab.eot_token_id
        self.buckets = length_buckets(context_length, buckets)

    @property
    def fingerprint(self) -> str:
        """Identifies the tokenization for cache keys."""
        return f"clip-bpe/{self.context_length}"

    def _encode_word(self, word: str) -> tuple[int, ...]:
        """The ids of one byte-encoded word, as open_clip's `encoder[bpe(word)]`."""
        special = self._special.get(word)
        if special is not None:
            return special
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        return tuple(self._encoder[s] for s in bpe_merge(symbols, self._ranks))

    def _word_ids(self, word: str) -> tuple[int, ...]:
        if len(word) <= CACHED_WORD_MAX_CHARS:
            return self._cached_word_ids(word)
        return self._encode_word(word)

    def tokenize(self, text: str, language: None = None) -> Tokens:
        """Ids exactly as `open_clip.tokenize` makes them, without the padding (`language`:
        the CLIP BPE takes none; the embedder refuses one before asking)."""
        budget = self.context_length - 2
        body: list[int] = []
        truncated = False
        cleaned = self._clean(text)
        byte_encoder = self._byte_encoder
        # BPE works word by word, so stopping once past the budget gives the same prefix
        # as encoding the whole text (a text of many words costs no more than its first ~77).
        for match in self._vocab.pat.finditer(cleaned):
            word = "".join(byte_encoder[b] for b in match.group().encode("utf-8"))
            body.extend(self._word_ids(word))
            if len(body) > budget:
                truncated = True
                break
        if truncated:
            # open_clip keeps context_length tokens and overwrites the last with end-of-text.
            ids = [self._sot, *body[: self.context_length - 2], self._eot]
        else:
            ids = [self._sot, *body, self._eot]
        return Tokens(tuple(ids), truncated)

    def bucket_length(self, n_tokens: int) -> int:
        """The padded length for a text of `n_tokens` ids: the next bucket edge."""
        return bucket_for(self.buckets, n_tokens)

    @staticmethod
    def pad(batch: Sequence[Tokens], length: int) -> np.ndarray:
        """`int64 [B, length]`, zero-padded (open_clip pads with 0 too)."""
        return pad_rows(batch, length)
