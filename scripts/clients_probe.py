"""Each client library's documented OpenAI-compatible settings against a running gateway.

Run by `scripts/clients_check.py` with the Python of `.venv-clients` (the libraries are
not the project's dependencies): `python clients_probe.py PORT`. Prints one JSON line per
client: {"client", "ok", "detail"}; vectors are compared with the official `openai`
client's for the same texts (max abs difference, 1e-5 allowed).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openai

PORT = int(sys.argv[1])
BASE = f"http://127.0.0.1:{PORT}/v1"
TEXTS = ["a red circle", "a photo of a blue star"]
TOL = 1e-5


def _reference() -> np.ndarray:
    client = openai.OpenAI(base_url=BASE, api_key="unused", max_retries=0)
    answer = client.embeddings.create(model="clip", input=TEXTS)
    return np.asarray([d.embedding for d in answer.data], dtype=np.float32)


def langchain_default() -> list[list[float]]:
    import llama_index.core
    from langchain_openai import OpenAIEmbeddings

    # tiktoken downloads its cl100k_base file on first use; llama-index-core ships that
    # file, so the default (token ids) runs without network.
    cache = Path(llama_index.core.__file__).parent / "_static" / "tiktoken_cache"
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(cache))

    return OpenAIEmbeddings(model="clip", base_url=BASE, api_key="unused").embed_documents(TEXTS)


def langchain_fixed() -> list[list[float]]:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="clip", base_url=BASE, api_key="unused", check_embedding_ctx_length=False
    )
    return embeddings.embed_documents(TEXTS)


def langchain_many() -> list[list[float]]:
    """1,200 texts: LangChain's default chunk_size=1000 sends 1,000 in one request."""
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="clip", base_url=BASE, api_key="unused", check_embedding_ctx_length=False
    )
    texts = TEXTS + [f"shape number {i}" for i in range(1198)]
    vectors = embeddings.embed_documents(texts)
    assert len(vectors) == len(texts), len(vectors)
    return vectors[: len(TEXTS)]


def llamaindex() -> list[list[float]]:
    from llama_index.embeddings.openai import OpenAIEmbedding

    model = OpenAIEmbedding(model_name="clip", api_base=BASE, api_key="unused")
    return model.get_text_embedding_batch(TEXTS)


def litellm_() -> list[list[float]]:
    import litellm

    answer = litellm.embedding(model="openai/clip", api_base=BASE, api_key="unused", input=TEXTS)
    return [d["embedding"] for d in answer.data]


def haystack() -> list[list[float]]:
    from haystack.components.embedders import OpenAITextEmbedder
    from haystack.utils import Secret

    embedder = OpenAITextEmbedder(
        model="clip", api_base_url=BASE, api_key=Secret.from_token("unused")
    )
    return [embedder.run(text=t)["embedding"] for t in TEXTS]


def main() -> int:
    want = _reference()
    failed = 0
    probes: list[tuple[str, Callable[[], list[list[float]]], bool]] = [
        ("langchain default (token ids)", langchain_default, False),
        ("langchain check_embedding_ctx_length=False", langchain_fixed, True),
        ("langchain 1200 texts, chunk_size=1000", langchain_many, True),
        ("llamaindex OpenAIEmbedding", llamaindex, True),
        ("litellm openai/clip", litellm_, True),
        ("haystack OpenAITextEmbedder", haystack, True),
    ]
    for name, probe, should_work in probes:
        try:
            got = np.asarray(probe(), dtype=np.float32)
            diff = float(np.abs(got - want).max()) if got.shape == want.shape else None
            ok = should_work and diff is not None and diff <= TOL
            detail = f"shape {got.shape}, max abs diff {diff}"
        except Exception as exc:  # the refusal expected of LangChain's default
            text = f"{type(exc).__name__}: {exc}"
            ok = not should_work and "check_embedding_ctx_length=False" in text
            detail = text[:400] if ok else traceback.format_exc()[-1200:]
        failed += not ok
        print(json.dumps({"client": name, "ok": ok, "detail": detail}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
