"""What compact vectors cost in retrieval: recall@10 of int8 and binary against float32.

    python -m bench.quantization [--corpus 2000] [--queries 100]   # ~25 min on 2 busy cores

What it measures and how: bench/README.md.
"""

from __future__ import annotations

import datetime as dt
import itertools
import random
import time
from collections.abc import Callable

import numpy as np
import open_clip
import torch

from bench import harness as h
from service.core import vector_formats as vf
from service.demo import shapes
from service.model import configs
from service.model.export import load_open_clip

K = 10
RESCORE = 4  # binary, then float32 rescoring of the top K × RESCORE (Sentence-Transformers)


def demo_images(n: int) -> np.ndarray:
    """`[n, 64]`: the trained demo CLIP's vectors of `n` rendered shape images."""
    configs.register()
    model, _, preprocess = open_clip.create_model_and_transforms(
        "clip-demo-shapes", pretrained=str(h.DEMO_WEIGHTS)
    )
    model.eval()
    rng = random.Random(26)
    images = [shapes.sample(rng, shapes.ALL_PAIRS)[0] for _ in range(n)]
    preprocessed = lambda batch: torch.stack([preprocess(i) for i in batch])  # noqa: E731
    return _encode(lambda batch: model.encode_image(preprocessed(batch), normalize=True), images)


def vit_texts(n: int) -> np.ndarray:
    """`[n, 512]`: random-weight ViT-B-32's vectors of `n` distinct generated captions."""
    torch.manual_seed(26)
    model, _ = load_open_clip("ViT-B-32", "none")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    words = itertools.product(
        ("a", "the", "one", "my"),
        ("small", "large", "old", "shiny", "wet", "striped", "broken", "bright"),
        ("red", "blue", "green", "black", "white", "yellow", "purple", "grey"),
        ("car", "dog", "house", "tree", "boat", "chair", "bird", "lamp", "cup", "hat"),
        ("on a beach", "in the snow", "at night", "near a river", "in a city", "on a table"),
    )
    captions = [" ".join(w) for w in itertools.islice(words, n)]
    return _encode(lambda batch: model.encode_text(tokenizer(batch), normalize=True), captions)


def _encode(run: Callable[[list], torch.Tensor], items: list, batch: int = 64) -> np.ndarray:
    with torch.no_grad():
        parts = [run(items[i : i + batch]).numpy() for i in range(0, len(items), batch)]
    return np.concatenate(parts).astype(np.float32)


def top_k(scores: np.ndarray) -> np.ndarray:
    """Indices of each row's K highest scores (ties: the lower index first)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :K]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true K found."""
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def signs(packed: np.ndarray, dim: int) -> np.ndarray:
    """ubinary rows → ±1 floats (the dot product of two is D − 2 × Hamming distance)."""
    return np.unpackbits(packed, axis=1)[:, :dim].astype(np.float32) * 2 - 1


def evaluate(corpus: np.ndarray, queries: np.ndarray) -> list[tuple[str, int, float]]:
    """(rule, bytes per vector, recall@10) for each compact rule."""
    dim = corpus.shape[1]
    truth = top_k(queries @ corpus.T)

    def unit(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32) / np.linalg.norm(x.astype(np.float32), axis=1, keepdims=True)

    cosine = lambda a, b: unit(a) @ unit(b).T  # noqa: E731

    int8_c, int8_q = vf.quantize(corpus, vf.INT8), vf.quantize(queries, vf.INT8)
    fixed_c, fixed_q = (np.rint(x * 127).astype(np.int8) for x in (corpus, queries))
    bits_c, bits_q = (signs(vf.quantize(x, vf.UBINARY), dim) for x in (corpus, queries))
    hamming_top = np.argsort(-(bits_q @ bits_c.T), axis=1, kind="stable")[:, : K * RESCORE]
    rescored = np.take_along_axis(
        hamming_top, top_k(np.einsum("qd,qkd->qk", queries, corpus[hamming_top])), axis=1
    )
    f32, i8, b1 = (vf.packed_bytes(dim, f) for f in (vf.FLOAT32, vf.INT8, vf.UBINARY))
    dot = lambda q, c: q.astype(np.float32) @ c.T.astype(np.float32)  # noqa: E731
    served, fixed = "int8, per-vector scale (served)", "int8, fixed [-1, 1] scale (not served)"
    rows = [
        (f"{served}, cosine", i8, cosine(int8_q, int8_c)),
        (f"{served}, raw dot product", i8, dot(int8_q, int8_c)),
        (f"{fixed}, cosine", i8, cosine(fixed_q, fixed_c)),
        (f"{fixed}, dot product", i8, dot(fixed_q, fixed_c)),
        ("binary / ubinary, Hamming distance", b1, bits_q @ bits_c.T),
    ]
    return [
        ("float32 (the truth)", f32, 1.0),
        *((name, size, recall(top_k(scores), truth)) for name, size, scores in rows),
        (f"binary top {K * RESCORE}, rescored with float32 queries and vectors", b1,
         recall(rescored, truth)),
    ]  # fmt: skip


def main() -> None:
    parser = h.parser(__doc__, out="quantization.md", model=None, threads=False)
    parser.add_argument("--corpus", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    lines = [
        "# Compact vectors: recall@10 against float32", "",
        f"`python -m bench.quantization --corpus {args.corpus} --queries {args.queries}`, "
        f"{dt.date.today().isoformat()}. Truth: each query's 10 nearest corpus vectors by "
        "float32 cosine; queries and corpus both quantized by the served rules; ties broken "
        "by corpus order. The demo set is near-duplicate heavy (48 classes of rendered "
        "shapes): a query's 10 nearest are same-class images a hair apart, which any "
        "quantization reorders. ViT-B-32 has random weights: the production width, not "
        "trained geometry.", "",
    ]  # fmt: skip
    for name, make in (("demo-images", demo_images), ("vit-b-32-texts", vit_texts)):
        started = time.perf_counter()
        vectors = make(args.corpus + args.queries)
        rows = evaluate(vectors[: args.corpus], vectors[args.corpus :])
        dim = vectors.shape[1]
        print(f"{name}: D={dim}, {time.perf_counter() - started:.0f}s")
        for rule, size, value in rows:
            print(f"  {rule:70s} {size:5d} B  recall@10 {value:.3f}")
        table = [(rule, size, f"{value:.3f}") for rule, size, value in rows]
        table = h.md_table(["rule", "bytes / vector", "recall@10"], table)
        heading = f"## {name} (D = {dim}, {args.corpus} corpus, {args.queries} queries)"
        lines += [heading, "", table, ""]
    h.write_result(args.out, "\n".join(lines), "\n".join(lines))


if __name__ == "__main__":
    main()
