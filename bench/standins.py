"""Offline stand-ins for what open_clip configs fetch from the hub: tokenizers and HF text
configs, trained or written here in milliseconds. Shared by `bench.families` (which swaps
them in for hub names) and the tests' tiny families (`tests/support/families.py`); tests
may import bench, bench never imports tests.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "a photo of a cat",
    "a photo of a dog sitting on the grass",
    "a diagram of a red circle beside a blue square",
    "un chat assis sur le rebord de la fenêtre",
    "кошка сидит на подоконнике",
    "一只在雪地里玩耍的金毛猎犬",
    "the quick brown fox jumps over the lazy dog",
    "tabs and newlines and caps with underscores html",
] * 4

#: Tokenizer shapes by family: (kind, transformers' roles → special tokens in id order,
#: post-processor templates (single, pair)).
STYLES: dict[str, tuple[str, dict[str, str], tuple[str, str]]] = {
    # BERT (CLIPA): [CLS] ... [SEP]
    "bert": ("bpe", {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                     "sep_token": "[SEP]"}, ("[CLS] $A [SEP]", "[CLS] $A [SEP] $B [SEP]")),
    # mT5 / SigLIP / MetaCLIP worldwide: <pad> 0, </s> 1, eos appended
    "t5": ("unigram", {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
           ("$A </s>", "$A </s> $B </s>")),
    # SigLIP's test family: <unk> 0, <pad> 1 (a pad id that is not 0)
    "siglip": ("unigram", {"unk_token": "<unk>", "pad_token": "<pad>", "eos_token": "</s>"},
               ("$A </s>", "$A </s> $B </s>")),
    # XLM-R, RoBERTa, XLM-V, NLLB: <s> 0, <pad> 1, </s> 2, <unk> 3
    "xlmr": ("bpe", {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>",
                     "unk_token": "<unk>", "cls_token": "<s>", "sep_token": "</s>"},
             ("<s> $A </s>", "<s> $A </s> </s> $B </s>")),
}  # fmt: skip


def train_tokenizer(
    directory: Path, *, kind: str, specials: dict[str, str], template: tuple[str, str]
) -> Path:
    """A small tokenizer trained on a few sentences (`kind` "unigram" or "bpe"), with the
    special tokens `specials` (transformers' roles → tokens, ids in that order) and the
    post-processor `template` (single, pair), saved into `directory` as transformers
    saves one."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokens = list(dict.fromkeys(specials.values()))
    if kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=300, special_tokens=tokens, unk_token=specials["unk_token"]
        )
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=tokens, initial_alphabet=alphabet
        )
    tokenizer.train_from_iterator(CORPUS, trainer)
    single, pair = template
    used = {t for t in tokens if t in single or t in pair}
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tokenizer.token_to_id(t)) for t in used]
    )
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials).save_pretrained(str(directory))
    return directory


def styled_tokenizer(directory: Path, style: str) -> Path:
    """`train_tokenizer` with one of the `STYLES`."""
    kind, specials, template = STYLES[style]
    return train_tokenizer(directory, kind=kind, specials=specials, template=template)


def nllb_tokenizer(directory: Path) -> Path:
    """transformers' NLLB tokenizer over a BPE trained here: its ~200 language codes are
    special tokens and the source language is the first id of every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import NllbTokenizer

    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    model = json.loads(base.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = NllbTokenizer(vocab=model["vocab"], merges=merges, src_lang="eng_Latn")
    tokenizer.save_pretrained(str(directory))
    return directory


def tiny_hf_config(model_type: str, directory: Path, *, width: int, max_positions: int) -> Path:
    """A tiny HF text-model config of `model_type` (xlm-roberta, roberta, m2m100, mt5) for
    the tokenizer in `directory`, saved beside it: 2 layers, heads of 16, FFN 2 × width."""
    from transformers import AutoTokenizer, M2M100Config, MT5Config, RobertaConfig, XLMRobertaConfig

    tok = AutoTokenizer.from_pretrained(str(directory))
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    heads, ffn = width // 16, 2 * width
    if model_type == "mt5":
        config = MT5Config(d_model=width, d_kv=16, d_ff=ffn, num_layers=2, num_heads=heads, **ids)
    elif model_type == "m2m100":
        config = M2M100Config(
            d_model=width, encoder_layers=2, decoder_layers=1, encoder_attention_heads=heads,
            decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
            max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id, **ids,
        )  # fmt: skip
    else:
        cls = RobertaConfig if model_type == "roberta" else XLMRobertaConfig
        config = cls(
            hidden_size=width, num_hidden_layers=2, num_attention_heads=heads,
            intermediate_size=ffn, max_position_embeddings=max_positions,
            bos_token_id=tok.bos_token_id, **ids,
        )  # fmt: skip
    config.save_pretrained(str(directory))
    return directory
