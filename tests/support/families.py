"""Tiny open_clip model configs, one per family, with HF tokenizers and text towers built
offline (no hub): what the family tests export and serve.

Each `write_family(name, dir)` writes an open_clip model-config JSON (and, where the family
needs one, a HF tokenizer trained here in milliseconds and a tiny HF text config) and
returns the JSON's path; `clipsvc export --model PATH.json` takes it as is.
"""

from __future__ import annotations

import json
from pathlib import Path

#: One representative per family (see README "Model families").
FAMILIES = (
    "clip",
    "clipa",
    "worldwide",
    "siglip",
    "eva",
    "mobileclip",
    "xlm-roberta",
    "nllb",
    "coca",
)

_CORPUS = [
    "a photo of a cat",
    "a photo of a dog sitting on the grass",
    "a diagram of a red circle beside a blue square",
    "un chat assis sur le rebord de la fenêtre",
    "кошка сидит на подоконнике",
    "一只在雪地里玩耍的金毛猎犬",
    "the quick brown fox jumps over the lazy dog",
    "tabs and newlines and caps with underscores html",
] * 4

_TINY_TEXT = {"width": 32, "heads": 2, "layers": 2}


def _vision(timm_model: str | None = None, **extra: object) -> dict[str, object]:
    if timm_model is None:
        return {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 16,
            **extra,
        }
    # open_clip gives timm no image size: timm towers run at their own (224).
    return {
        "image_size": 224,
        "timm_model_name": timm_model,
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
        **extra,
    }


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
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    single, pair = template
    used = {t for t in tokens if t in single or t in pair}
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tokenizer.token_to_id(t)) for t in used]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)
    fast.save_pretrained(str(directory))
    return directory


def _nllb_tokenizer(directory: Path) -> Path:
    """transformers' NLLB tokenizer over a BPE trained here: its ~200 language codes are
    special tokens and the source language is the first id of every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import NllbTokenizer

    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace()
    base.train_from_iterator(
        _CORPUS,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"]),
    )
    model = json.loads(base.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    NllbTokenizer(vocab=model["vocab"], merges=merges, src_lang="eng_Latn").save_pretrained(
        str(directory)
    )
    return directory


def write_family(family: str, directory: Path) -> Path:
    """Write family `family`'s tiny model config (and tokenizer, HF config) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"tiny-{family}"
    if family == "clip":
        cfg = {
            "embed_dim": 24,
            "vision_cfg": _vision(),
            "text_cfg": {"context_length": 77, "vocab_size": 49408, **_TINY_TEXT},
        }
    elif family == "clipa":
        # CLIPA: CLIP's own text tower with BERT's tokenizer (its [SEP] stripped to 0),
        # no causal mask, pooling the last position.
        tok = train_tokenizer(
            directory / "tokenizer",
            kind="bpe",
            specials={
                "pad_token": "[PAD]",
                "unk_token": "[UNK]",
                "cls_token": "[CLS]",
                "sep_token": "[SEP]",
            },
            template=("[CLS] $A [SEP]", "[CLS] $A [SEP] $B [SEP]"),
        )
        cfg = {
            "embed_dim": 24,
            "vision_cfg": _vision(),
            "text_cfg": {
                "context_length": 16,
                "vocab_size": 400,
                "hf_tokenizer_name": str(tok),
                "tokenizer_kwargs": {"strip_sep_token": True},
                "pool_type": "last",
                "no_causal_mask": True,
                **_TINY_TEXT,
            },
        }
    elif family == "worldwide":
        # MetaCLIP 2 worldwide: CLIP's own causal text tower with a multilingual HF
        # tokenizer (mT5's order: <pad> 0, </s> 1), pooling at its end-of-sequence id.
        tok = train_tokenizer(
            directory / "tokenizer",
            kind="unigram",
            specials={"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
            template=("$A </s>", "$A </s> $B </s>"),
        )
        cfg = {
            "embed_dim": 24,
            "vision_cfg": _vision(),
            "text_cfg": {
                "context_length": 16,
                "vocab_size": 300,
                "hf_tokenizer_name": str(tok),
                "pool_type": "eos",
                "eos_id": 1,
                **_TINY_TEXT,
            },
        }
    elif family == "siglip":
        # SigLIP: HF tokenizer (eos appended, canonicalize), fixed context, `last` pooling
        # without a causal mask, timm image tower, a logit bias.
        tok = train_tokenizer(
            directory / "tokenizer",
            kind="unigram",
            specials={"unk_token": "<unk>", "pad_token": "<pad>", "eos_token": "</s>"},
            template=("$A </s>", "$A </s> $B </s>"),
        )
        cfg = {
            "embed_dim": 24,
            "init_logit_bias": -10,
            "custom_text": True,
            "vision_cfg": _vision("vit_tiny_patch16_224", timm_pool="map", timm_proj="none"),
            "text_cfg": {
                "context_length": 16,
                "vocab_size": 300,
                "hf_tokenizer_name": str(tok),
                "tokenizer_kwargs": {"clean": "canonicalize"},
                "no_causal_mask": True,
                "proj_bias": True,
                "pool_type": "last",
                "norm_kwargs": {"eps": 1e-6},
                **_TINY_TEXT,
                "width": 192,
                "heads": 3,
            },
        }
        cfg["embed_dim"] = 192  # SigLIP's text projection maps width → embed_dim
    elif family == "eva":
        # EVA02: timm image tower, open_clip's causal text tower on CustomTextCLIP.
        cfg = {
            "embed_dim": 24,
            "custom_text": True,
            "vision_cfg": _vision("eva02_tiny_patch14_224", timm_pool="token", timm_proj=None),
            "text_cfg": {"context_length": 77, "vocab_size": 49408, **_TINY_TEXT},
        }
        cfg["embed_dim"] = 192  # timm_proj None: the image tower's width is the embedding
    elif family == "mobileclip":
        # MobileCLIP/MobileCLIP2: CLIP's BPE, a text tower without a causal mask (full padding).
        cfg = {
            "embed_dim": 24,
            "custom_text": True,
            "vision_cfg": {**_vision("resnet18", timm_pool="avg"), "image_size": 64},
            "text_cfg": {
                "context_length": 77,
                "vocab_size": 49408,
                "no_causal_mask": True,
                **_TINY_TEXT,
            },
        }
    elif family == "xlm-roberta":
        from transformers import XLMRobertaConfig

        tok = train_tokenizer(
            directory / "tokenizer",
            kind="bpe",
            # XLM-R's order: <s> 0, <pad> 1, </s> 2, <unk> 3 (positions start past the pad id).
            specials={
                "bos_token": "<s>",
                "pad_token": "<pad>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "cls_token": "<s>",
                "sep_token": "</s>",
            },
            template=("<s> $A </s>", "<s> $A </s> </s> $B </s>"),
        )
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(tok))
        XLMRobertaConfig(
            vocab_size=len(hf_tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=80,
            pad_token_id=hf_tok.pad_token_id,
            bos_token_id=hf_tok.bos_token_id,
            eos_token_id=hf_tok.eos_token_id,
        ).save_pretrained(str(tok))
        cfg = {
            "embed_dim": 24,
            "vision_cfg": _vision(),
            "text_cfg": {
                "hf_model_name": str(tok),
                "hf_tokenizer_name": str(tok),
                "hf_pooler_type": "mean_pooler",
                "context_length": 24,
            },
        }
    elif family == "nllb":
        # NLLB: an M2M100 encoder as HF text tower, a tokenizer that takes a language.
        tok = _nllb_tokenizer(directory / "tokenizer")
        from transformers import AutoTokenizer, M2M100Config

        hf_tok = AutoTokenizer.from_pretrained(str(tok))
        M2M100Config(
            vocab_size=len(hf_tok),
            d_model=32,
            encoder_layers=2,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            pad_token_id=hf_tok.pad_token_id,
            bos_token_id=hf_tok.bos_token_id,
            eos_token_id=hf_tok.eos_token_id,
        ).save_pretrained(str(tok))
        cfg = {
            "embed_dim": 24,
            "vision_cfg": _vision(),
            "text_cfg": {
                "hf_model_name": str(tok),
                "hf_tokenizer_name": str(tok),
                "hf_proj_type": "linear",
                "hf_pooler_type": "cls_pooler",
                "context_length": 20,
            },
        }
    elif family == "coca":
        cfg = {
            "embed_dim": 24,
            "custom_text": True,
            "vision_cfg": _vision(attentional_pool=True, attn_pooler_heads=2, output_tokens=True),
            "text_cfg": {
                "context_length": 20,
                "vocab_size": 49408,
                "embed_cls": True,
                "output_tokens": True,
                **_TINY_TEXT,
            },
            "multimodal_cfg": {
                "context_length": 20,
                "vocab_size": 49408,
                "attn_pooler_heads": 2,
                **_TINY_TEXT,
            },
        }
    else:
        raise ValueError(f"unknown family {family!r}")
    path = directory / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path
