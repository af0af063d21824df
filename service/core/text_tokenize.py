"""Where text becomes token ids: open_clip's CLIP BPE, truncation flag, length buckets."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from open_clip.tokenizer import SimpleTokenizer


@dataclass(frozen=True)
class Tokens:
    """One text's ids: [start, ..., end] (≤ context length) and whether it was cut."""

    ids: tuple[int, ...]
    truncated: bool


class TextTokenizer:
    """open_clip's tokenizer with the same truncation, plus padding to length buckets."""

    def __init__(self, context_length: int, buckets: Sequence[int] = ()):
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self._sot = self._bpe.sot_token_id
        self._eot = self._bpe.eot_token_id
        edges = sorted({int(b) for b in buckets if 2 <= int(b) < context_length})
        self.buckets: tuple[int, ...] = (*edges, context_length)

    @property
    def fingerprint(self) -> str:
        """Identifies the tokenization for cache keys."""
        return f"clip-bpe/{self.context_length}"

    def tokenize(self, text: str) -> Tokens:
        """Ids exactly as `open_clip.tokenize` makes them, without the padding."""
        budget = self.context_length - 2
        body: list[int] = []
        truncated = False
        cleaned = self._bpe.clean_fn(text)
        # BPE works word by word, so stopping once past the budget gives the same prefix
        # as encoding the whole text (a 10,000-character text costs no more than 77 tokens).
        for match in self._bpe.pat.finditer(cleaned):
            word = "".join(self._bpe.byte_encoder[b] for b in match.group().encode("utf-8"))
            body.extend(self._bpe.encoder[piece] for piece in self._bpe.bpe(word).split(" "))
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
        return self.buckets[bisect_left(self.buckets, n_tokens)]

    @staticmethod
    def pad(batch: Sequence[Tokens], length: int) -> np.ndarray:
        """`int64 [B, length]`, zero-padded (open_clip pads with 0 too)."""
        out = np.zeros((len(batch), length), dtype=np.int64)
        for row, tokens in enumerate(batch):
            out[row, : len(tokens.ids)] = tokens.ids
        return out
