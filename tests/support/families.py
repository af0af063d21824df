"""Tiny open_clip model configs, one per family, with HF tokenizers and text towers built
offline (no hub): what the family tests export and serve.

Each `write_family(name, dir)` writes an open_clip model-config JSON (and, where the family
needs one, a HF tokenizer trained here in milliseconds and a tiny HF text config) and
returns the JSON's path; `clipsvc export --model PATH.json` takes it as is.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.standins import nllb_tokenizer, styled_tokenizer, tiny_hf_config

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


def _tower(text_cfg: dict[str, object]) -> dict[str, object]:
    """A tiny config with the default tiny image tower and `text_cfg`."""
    return {"embed_dim": 24, "vision_cfg": _vision(), "text_cfg": text_cfg}


def _hf_tower(tok: Path, context_length: int, **text: object) -> dict[str, object]:
    """`_tower` whose text side is an HF model and tokenizer stored in `tok`."""
    return _tower(
        {
            "hf_model_name": str(tok),
            "hf_tokenizer_name": str(tok),
            "context_length": context_length,
            **text,
        }
    )


def write_family(family: str, directory: Path) -> Path:
    """Write family `family`'s tiny model config (and tokenizer, HF config) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"tiny-{family}"
    if family == "clip":
        cfg = _tower({"context_length": 77, "vocab_size": 49408, **_TINY_TEXT})
    elif family == "clipa":
        # CLIPA: CLIP's own text tower with BERT's tokenizer (its [SEP] stripped to 0),
        # no causal mask, pooling the last position.
        tok = styled_tokenizer(directory / "tokenizer", "bert")
        cfg = _tower(
            {"context_length": 16, "vocab_size": 400, "hf_tokenizer_name": str(tok),
             "tokenizer_kwargs": {"strip_sep_token": True}, "pool_type": "last",
             "no_causal_mask": True, **_TINY_TEXT}
        )  # fmt: skip
    elif family == "worldwide":
        # MetaCLIP 2 worldwide: CLIP's own causal text tower with a multilingual HF
        # tokenizer (mT5's order: <pad> 0, </s> 1), pooling at its end-of-sequence id.
        tok = styled_tokenizer(directory / "tokenizer", "t5")
        cfg = _tower(
            {"context_length": 16, "vocab_size": 300, "hf_tokenizer_name": str(tok),
             "pool_type": "eos", "eos_id": 1, **_TINY_TEXT}
        )  # fmt: skip
    elif family == "siglip":
        # SigLIP: HF tokenizer (eos appended, canonicalize), fixed context, `last` pooling
        # without a causal mask, timm image tower, a logit bias.
        tok = styled_tokenizer(directory / "tokenizer", "siglip")
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
        tok = styled_tokenizer(directory / "tokenizer", "xlmr")
        # positions start past the pad id: 24 tokens need 26; 80 leaves room
        tiny_hf_config("xlm-roberta", tok, width=32, max_positions=80)
        cfg = _hf_tower(tok, 24, hf_pooler_type="mean_pooler")
    elif family == "nllb":
        # NLLB: an M2M100 encoder as HF text tower, a tokenizer that takes a language.
        tok = tiny_hf_config(
            "m2m100", nllb_tokenizer(directory / "tokenizer"), width=32, max_positions=64
        )
        cfg = _hf_tower(tok, 20, hf_proj_type="linear", hf_pooler_type="cls_pooler")
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
