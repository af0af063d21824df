"""Catalog search: recall@10 against exact cosine, query latency through the gateway,
indexing images/s (issue 31). Writes bench/results/catalog.md.

    python -m bench.catalog                   # 100k vectors (dims 64 and 512), ~10 min here
    python -m bench.catalog --n 20000 --images 96

What it measures and how: bench/README.md.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench import harness as h
from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.backends.milvus_store import MilvusStore
from service.backends.vector_store import IndexSettings, StoredItem
from service.core.catalog import collection_name
from service.demo.shapes import ALL_PAIRS, render
from service.model.metadata import load_repository
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.milvus_lite import MilvusLite

QUERIES = 200
NPROBES = (8, 32, 128)
QUERY_ROWS = (
    ("grpc_vector", "gRPC Search, vector"), ("http_vector", "HTTP /v1/search, vector"),
    ("grpc_text", "gRPC Search, text (embedded per query)"),
)  # fmt: skip


def clustered(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around 1,000 random directions (spread 0.7 per coordinate)."""
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    noise = 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    points = centres[rng.integers(0, 1000, n)] + noise
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    return h.percentile_ms(seconds, 50), h.percentile_ms(seconds, 99)


def fill(store: MilvusStore, name: str, vectors: np.ndarray, model_id: str) -> float:
    """Write `vectors` as items 0..N-1; vectors/s (upserts of 1,000, then sealed)."""
    store.open_collection(name, dim=vectors.shape[1], model_id=model_id)
    started = time.perf_counter()
    for start in range(0, len(vectors), 1000):
        end = min(start + 1000, len(vectors))
        store.upsert(
            name,
            [StoredItem(str(i), vectors[i], {"bucket": i % 10}, "") for i in range(start, end)],
        )
    store.flush(name)
    return len(vectors) / (time.perf_counter() - started)


def recall_rows(
    engine_uri: str, name: str, vectors: np.ndarray, queries: np.ndarray, index_type: str
) -> list[tuple[str, float, float, float]]:
    """(search setting, recall@10, p50 ms, p99 ms) of the engine alone."""
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    rows = []
    settings = (
        [(f"nprobe {n}", IndexSettings(nprobe=n)) for n in NPROBES]
        if index_type == "IVF_FLAT"
        else [("exact scan", IndexSettings(index_type=index_type))]
    )
    for label, index in settings:
        store = MilvusStore(engine_uri, index=index, timeout_s=120)
        store.search(name, queries[0], 10, None)  # loads the index
        found, seconds = 0, []
        for query, truth in zip(queries, exact, strict=True):
            started = time.perf_counter()
            hits = store.search(name, query, 10, None)
            seconds.append(time.perf_counter() - started)
            found += len({int(hit.id) for hit in hits} & set(truth.tolist()))
        store.close()
        rows.append((label, found / (10 * len(queries)), *percentiles(seconds)))
    return rows


def shapes_png(count: int) -> list[bytes]:
    """`count` rendered shapes (64×64 PNG), every colour-shape pair in turn."""
    rng = random.Random(3)
    images = []
    for i in range(count):
        buffer = io.BytesIO()
        render(*ALL_PAIRS[i % len(ALL_PAIRS)], rng).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


async def gateway_phase(
    repository: Path, catalog: Path, queries: np.ndarray, model_id: str, images: list[bytes]
) -> dict[str, object]:
    """Query latencies over gRPC and HTTP, and indexing rates, through one gateway."""
    settings = gateway_settings(repository, catalog=str(catalog), local_cache_items=0)
    out: dict[str, Any] = {}
    async with (
        running_gateway(settings) as gateway,
        h.channel(f"127.0.0.1:{gateway.port}") as channel,
        aiohttp.ClientSession() as session,
    ):
        stub = clip_pb2_grpc.ClipServiceStub(channel)
        search_url = f"http://127.0.0.1:{gateway.http_port}/v1/search"

        async def http_search(body: dict) -> None:
            async with session.post(search_url, json=body) as answer:
                await answer.read()
                assert answer.status == 200

        async def timed(key: str, call: Awaitable[object]) -> None:
            started = time.perf_counter()
            await call
            out.setdefault(key, []).append(time.perf_counter() - started)

        for i, query in enumerate(queries):
            vector = clip_pb2.QueryVector(values=query.tolist(), model_id=model_id)
            await timed("grpc_vector", stub.Search(clip_pb2.SearchRequest(vector=vector, top_k=10)))
            body = {"vector": query.tolist(), "vector_model": model_id, "top_k": 10}
            await timed("http_vector", http_search(body))
            # Distinct texts: every query is embedded (the cache is off as well).
            text = clip_pb2.SearchRequest(text=f"a blue star number {i}", top_k=10)
            await timed("grpc_text", stub.Search(text))
        out |= {key: percentiles(out[key]) for key, _ in QUERY_ROWS}

        async def rate(method: Callable, item: Callable, ok: Callable) -> float:
            async def items():
                for i, image in enumerate(images):
                    yield item(i, image)

            started = time.perf_counter()
            assert all([ok(a) async for a in method(items())])
            return len(images) / (time.perf_counter() - started)

        embedded = lambda a: a.WhichOneof("result") == "embedding"  # noqa: E731
        stream = lambda i, image: clip_pb2.StreamRequest(id=str(i), image=image)  # noqa: E731
        for r in range(3):  # interleaved: the machine's speed drifts
            add = lambda i, image, r=r: clip_pb2.CatalogItem(id=f"img_{r}_{i}", image=image)  # noqa: E731
            out.setdefault("embed_rates", []).append(await rate(stub.EmbedStream, stream, embedded))
            added = await rate(stub.CatalogAdd, add, lambda a: not a.HasField("error"))
            out.setdefault("add_rates", []).append(added)
    return out


def main() -> None:
    """Run the three phases and write the report."""
    parser = h.parser(__doc__, out="catalog.md", model=None, threads=False)
    parser.add_argument("--n", type=int, default=100_000, help="vectors per dimension")
    parser.add_argument("--images", type=int, default=192, help="images per indexing round")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    args = parser.parse_args()
    metadata = load_repository(args.repository)["clip"]
    index = IndexSettings()
    lines = [
        "# Catalog search (issue 31)",
        "",
        f"`python -m bench.catalog --n {args.n} --images {args.images}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, this 2-core shared machine.",
        "Engine: Milvus Lite 2.5.1 (pymilvus 2.6.17); the gateway's default index: "
        f"{index.describe()}.",
        f"Vectors: {args.n} clustered unit vectors per dimension (1,000 directions, spread "
        f"0.7), {QUERIES} held-out queries; exact = numpy cosine over all {args.n}.",
        "",
    ]
    rows, queries_64 = [], None
    with tempfile.TemporaryDirectory(prefix="bench-catalog-") as tmp:
        catalog = Path(tmp) / "catalog.db"
        with MilvusLite(catalog) as engine:
            for dim, index_type in ((64, "IVF_FLAT"), (64, "FLAT"), (512, "IVF_FLAT")):
                rng = np.random.default_rng(dim)  # the same vectors for both indexes of a dim
                vectors = clustered(args.n + QUERIES, dim, rng)
                data, queries = vectors[: args.n], vectors[args.n :]
                # The demo model's own collection (dim 64, the gateway's default index) is
                # searched through the gateway below.
                own = dim == metadata.embedding_dim and index_type == index.index_type
                name = f"bench_{dim}_{index_type.lower()}"
                name = collection_name(metadata.model_id, metadata.model_name) if own else name
                # As the gateway writes to its embedded engine (sole writer: new ids inserted).
                settings = IndexSettings(index_type=index_type)
                store = MilvusStore(engine.uri, index=settings, timeout_s=600, sole_writer=True)
                rate = fill(store, name, data, metadata.model_id if own else f"bench/{name}")
                store.close()
                print(f"dim {dim} {index_type}: wrote {args.n} at {rate:.0f}/s", flush=True)
                for label, recall, p50, p99 in recall_rows(
                    engine.uri, name, data, queries, index_type
                ):
                    print(f"  {label}: recall@10 {recall:.3f} p50 {p50:.1f} ms", flush=True)
                    rows.append([dim, index_type, f"{rate:.0f}", label, f"{recall:.3f}",
                                 f"{p50:.1f}", f"{p99:.1f}"])  # fmt: skip
                if own:
                    queries_64 = queries
        assert queries_64 is not None
        out = asyncio.run(gateway_phase(
            args.repository, catalog, queries_64, metadata.model_id, shapes_png(args.images)
        ))  # fmt: skip
    add, embed = np.median(out["add_rates"]), np.median(out["embed_rates"])
    rounds = {k: json.dumps([round(r, 1) for r in out[f"{k}_rates"]]) for k in ("add", "embed")}
    lines += [
        h.md_table(["dim", "index", "write vectors/s", "search", "recall@10", "engine p50 ms",
                    "p99 ms"], rows), "",
        f"Through the gateway (demo model, {args.n} vectors of dim 64, index "
        f"{index.describe()}, top_k 10, one closed-loop caller):", "",
        h.md_table(["query", "p50 ms", "p99 ms"],
                   [[label, *(f"{v:.1f}" for v in out[key])] for key, label in QUERY_ROWS]), "",
        f"Indexing {args.images} rendered 64×64 PNG shapes per round, 3 interleaved rounds "
        f"(median): CatalogAdd (embed + store) {add:.1f} images/s, EmbedStream (embed only) "
        f"{embed:.1f} images/s, ratio {add / embed:.2f}. Rounds: add {rounds['add']}, "
        f"embed {rounds['embed']}.", "",
    ]  # fmt: skip
    h.write_result(args.out, "\n".join(lines), "\n".join(lines))


if __name__ == "__main__":
    main()
