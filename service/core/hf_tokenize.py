"""Token ids for towers with a Hugging Face tokenizer (SigLIP, XLM-R, mT5, NLLB, BERT).

Contract: `tokenize(text)` + `pad` give exactly the rows of open_clip's `HFTokenizer`
(`open_clip.get_tokenizer(model)(texts)`): the same clean function first (open_clip's
`get_clean_fn`, copied into `clip_vocab`), the model's `tokenizer.json` (copied into the
repository by the export) run by the `tokenizers` library with its special tokens,
truncation to the context length (special tokens kept, as transformers does), padding with
the tokenizer's pad id, and open_clip's `strip_sep_token` (the [SEP] id becomes 0). The
export checks this equality on varied texts before it writes a repository, so a tokenizer
this class cannot reproduce never gets served.

Neither `transformers` nor open_clip (nor so torch) is needed here: only `tokenizers`, which
reads `tokenizer.json`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from service.core.clip_vocab import clean_function
from service.core.text_tokenize import (
    TextTokenizer,
    Tokens,
    bucket_for,
    length_buckets,
    pad_rows,
)
from service.model.metadata import ModelMetadata

#: Per-language tokenizers kept (NLLB has ~200 language codes; requests use a few).
_LANGUAGE_CACHE = 32


class HFTextTokenizer:
    """A `tokenizer.json` with open_clip's cleaning, truncation, padding and sep stripping."""

    def __init__(
        self,
        tokenizer_json: Path,
        context_length: int,
        *,
        clean: str = "whitespace",
        pad_token_id: int = 0,
        strip_sep_token_id: int | None = None,
        full_padding: bool = True,
        buckets: Sequence[int] = (),
        language: str | None = None,
    ) -> None:
        self.context_length = context_length
        self._json = Path(tokenizer_json).read_text(encoding="utf-8")
        self._clean_name = clean
        self._clean = clean_function(clean)
        self._pad_id = pad_token_id
        self._strip_sep_id = strip_sep_token_id
        self._language = language
        self._base = self._load(self._json)
        self._for_language = lru_cache(maxsize=_LANGUAGE_CACHE)(self._language_tokenizer)
        # Full padding: one bucket, the context length (the graph takes nothing shorter).
        self.buckets = length_buckets(context_length, () if full_padding else buckets)
        digest = hashlib.sha256(self._json.encode("utf-8")).hexdigest()[:16]
        strip = "" if strip_sep_token_id is None else f"/strip{strip_sep_token_id}"
        self._fingerprint = (
            f"hf/{digest}/{clean}/{context_length}/pad{pad_token_id}{strip}/"
            f"{'full' if full_padding else 'trim'}"
        )

    def _load(self, tokenizer_json: str):  # -> tokenizers.Tokenizer
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer_json)
        tokenizer.no_padding()
        # transformers' `truncation=True, max_length=L`: longest-first, special tokens kept.
        tokenizer.enable_truncation(max_length=self.context_length)
        return tokenizer

    def _language_tokenizer(self, language: str):  # -> tokenizers.Tokenizer
        """The tokenizer whose special-token template names `language` instead of the
        default one (NLLB's `set_src_lang_special_tokens`: `[lang] ... </s>`)."""
        raw = json.loads(self._json)
        template = raw.get("post_processor")
        if self._language is None or template is None:
            raise ValueError("this tokenizer takes no language")
        text = json.dumps(template).replace(json.dumps(self._language), json.dumps(language))
        raw["post_processor"] = json.loads(text)
        added = {t["content"]: t["id"] for t in raw.get("added_tokens", [])}
        if language not in added:
            raise ValueError(f"unknown language {language!r}")
        # TemplateProcessing names each special token's id: point it at the new code's id.
        specials = raw["post_processor"].get("special_tokens", {})
        if language in specials:
            specials[language]["ids"] = [added[language]]
        return self._load(json.dumps(raw))

    @property
    def fingerprint(self) -> str:
        """Identifies the tokenization for cache keys (the tokenizer file's hash included)."""
        return self._fingerprint

    def tokenize(self, text: str, language: str | None = None) -> Tokens:
        """Ids as open_clip's `HFTokenizer` makes them, without the padding."""
        tokenizer = self._base
        if language is not None and language != self._language:
            tokenizer = self._for_language(language)
        encoding = tokenizer.encode(self._clean(text))
        ids = encoding.ids
        if self._strip_sep_id is not None:
            ids = [0 if i == self._strip_sep_id else i for i in ids]
        return Tokens(tuple(ids), bool(encoding.overflowing))

    def bucket_length(self, n_tokens: int) -> int:
        """The padded length for `n_tokens` ids: the context length under full padding."""
        return bucket_for(self.buckets, n_tokens)

    def pad(self, batch: Sequence[Tokens], length: int) -> np.ndarray:
        """`int64 [B, length]` filled with the pad id after each row's ids."""
        return pad_rows(batch, length, self._pad_id)


#: What the embedder tokenizes with: the CLIP BPE or a HF tokenizer (same methods).
Tokenizer = TextTokenizer | HFTextTokenizer


def build_tokenizer(metadata: ModelMetadata, buckets: Sequence[int] = ()) -> Tokenizer:
    """The tokenizer `metadata.json` describes, with files from its repository.

    Repositories exported before these fields existed are CLIP BPE with trimmed padding.
    """
    full = metadata.text_padding == "full"
    if metadata.tokenizer == "clip-bpe":
        # Full padding: one bucket, the context length (the graph takes nothing shorter).
        return TextTokenizer(metadata.context_length, () if full else buckets)
    if metadata.tokenizer != "hf":
        raise ValueError(f"unknown tokenizer kind {metadata.tokenizer!r} in metadata.json")
    return HFTextTokenizer(
        Path(metadata.repository) / metadata.tokenizer_file,
        metadata.context_length,
        clean=metadata.tokenizer_clean,
        pad_token_id=metadata.pad_token_id,
        strip_sep_token_id=metadata.strip_sep_token_id,
        full_padding=full,
        buckets=buckets,
        language=metadata.language,
    )
