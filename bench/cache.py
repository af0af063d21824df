"""Cached against uncached EmbedText and EmbedImage through the gateway, in one run.

    python -m bench.cache                       # demo model, LRU and a real redis-server
    python -m bench.cache --model ViT-B-32 --quick

One gateway (its own process) per cache setup: none (the baseline), the in-process
LRU only, Redis only (`local_cache_items=0`, every hit is a Redis MGET) and LRU +
Redis (production). For each: single-item calls with inputs never seen before
(misses: the full pipeline plus the cache fill) and with a warm set of inputs
(hits), at each concurrency. Hits and misses are checked against the gateway's own
cache counters. Writes bench/results/cache.md.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.common import (
    RESULTS_DIR,
    LoadResult,
    RawClip,
    add_threading_arguments,
    channel_options,
    closed_loop,
    fmt,
    machine_info,
    md_table,
    mixed_caption,
    model_repository,
    photo_pool,
    run_benchmark,
    section,
    threading_note,
    unique_jpeg,
    write_result,
)
from service.api.clip.v1 import clip_pb2
from service.processes.gateway import GatewayProcess
from service.processes.metric_samples import scrape

PACKED = clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES
WARM_SET = 64  # more than the highest concurrency: concurrent hits never share a key


@dataclass(frozen=True)
class Setup:
    """One cache configuration of the gateway."""

    name: str
    local_items: int
    redis: bool


SETUPS = (
    Setup("no cache", 0, False),
    Setup("LRU", 10_000, False),
    Setup("Redis", 0, True),
    Setup("LRU + Redis", 10_000, True),
)


@dataclass
class Row:
    """One measured point."""

    setup: str
    modality: str
    state: str  # miss / hit / none
    concurrency: int
    result: LoadResult
    hits: dict[str, float]
    cache_errors: float


def calls_for(
    client: RawClip, jpegs: list[bytes], modality: str, warm: bool, offset: int
) -> Callable[[int], Awaitable[int]]:
    """Single-item calls: fresh inputs (`i` never repeats), or the warm set over and over."""

    def pick(i: int) -> int:
        return offset + (i % WARM_SET if warm else WARM_SET + i)

    if modality == "text":

        async def text(i: int) -> int:
            request = clip_pb2.EmbedTextRequest(texts=[mixed_caption(pick(i))], format=PACKED)
            await client.embed_text(request.SerializeToString(), timeout=120)
            return 1

        return text

    async def image(i: int) -> int:
        n = pick(i)
        request = clip_pb2.EmbedImageRequest(
            images=[unique_jpeg(jpegs[n % len(jpegs)], n)], format=PACKED
        )
        await client.embed_image(request.SerializeToString(), timeout=120)
        return 1

    return image


def cache_counters(metrics_port: int) -> dict[str, float]:
    """Hits per level and errors so far."""
    samples = scrape(metrics_port)
    out = {
        level: samples.get(f'clip_cache_hits_total{{level="{level}"}}', 0.0)
        for level in ("local", "redis")
    }
    out["errors"] = sum(v for k, v in samples.items() if k.startswith("clip_cache_errors_total"))
    return out


async def measure_setup(
    setup: Setup,
    gateway: GatewayProcess,
    jpegs: list[bytes],
    args: argparse.Namespace,
    offsets: Iterator[int],
) -> list[Row]:
    """Misses then hits (or plain calls for `no cache`) for both modalities."""
    rows: list[Row] = []
    async with grpc.aio.insecure_channel(gateway.target, options=channel_options()) as channel:
        client = RawClip(channel)
        for modality in ("text", "image"):
            states = ("none",) if setup.name == "no cache" else ("miss", "hit")
            for state in states:
                for concurrency in args.concurrencies:
                    # Each point gets inputs of its own: no point warms another's cache.
                    offset = next(offsets)
                    call = calls_for(client, jpegs, modality, state == "hit", offset)
                    if state == "hit":
                        for i in range(WARM_SET):  # fill the cache with the warm set
                            await call(i)
                    before = cache_counters(gateway.metrics_port)
                    marks: dict[str, float] = {}
                    result = await closed_loop(
                        call,
                        label=f"{setup.name} {modality} {state} c{concurrency}",
                        concurrency=concurrency,
                        seconds=args.seconds,
                        min_calls=2 * concurrency,
                        before_measure=lambda marks=marks: marks.update(
                            cache_counters(gateway.metrics_port)
                        ),
                    )
                    after = cache_counters(gateway.metrics_port)
                    marks = marks or before
                    hits = {
                        level: (after[level] - marks[level]) / max(len(result.latencies_s), 1)
                        for level in ("local", "redis")
                    }
                    row = Row(
                        setup.name, modality, state, concurrency, result, hits,
                        after["errors"] - marks["errors"],
                    )  # fmt: skip
                    rows.append(row)
                    print(
                        f"  {setup.name:<12} {modality:<5} {state:<4} c{concurrency:<3} "
                        f"{fmt(result.calls_per_s):>8} req/s, p50 {fmt(result.percentile_ms(50))}"
                        f" ms, p99 {fmt(result.percentile_ms(99))} ms, hit rate "
                        f"LRU {hits['local']:.0%} Redis {hits['redis']:.0%}, "
                        f"cache errors {row.cache_errors:.0f}, call errors {result.error_text}",
                        flush=True,
                    )
    return rows


def report(rows: Sequence[Row], args: argparse.Namespace, info: list[tuple[str, str]]) -> str:
    """Markdown: every point, then the ratios against `no cache`."""

    def base(modality: str, concurrency: int) -> Row | None:
        return next(
            (
                r
                for r in rows
                if (r.setup, r.modality, r.concurrency) == ("no cache", modality, concurrency)
            ),
            None,
        )

    point_rows = [
        [
            r.setup, r.modality, r.state, r.concurrency, fmt(r.result.calls_per_s),
            fmt(r.result.percentile_ms(50), 2), fmt(r.result.percentile_ms(99), 2),
            f"{r.hits['local']:.0%} / {r.hits['redis']:.0%}", f"{r.cache_errors:.0f}",
            r.result.error_text,
        ]
        for r in rows
    ]  # fmt: skip
    ratio_rows = []
    for r in rows:
        b = base(r.modality, r.concurrency)
        if r.setup == "no cache" or b is None:
            continue
        ratio_rows.append(
            [
                r.setup, r.modality, r.state, r.concurrency,
                f"{r.result.calls_per_s / b.result.calls_per_s:.2f}×",
                f"{r.result.percentile_ms(50) / b.result.percentile_ms(50):.2f}×",
                f"{r.result.percentile_ms(99) / b.result.percentile_ms(99):.2f}×",
            ]
        )  # fmt: skip
    headers = [
        "cache", "input", "state", "concurrency", "req/s", "p50 ms", "p99 ms",
        "hit rate LRU / Redis", "cache errors", "call errors",
    ]  # fmt: skip
    parts = [
        f"# Cache: {args.model}",
        "",
        md_table(["", ""], info),
        "",
        "Single-item calls through a gateway in its own process. `miss`: every input is new "
        "(the whole pipeline, plus the LRU/Redis fill); `hit`: a warm set of "
        f"{WARM_SET} inputs embedded once before the point, then called again and again; "
        "`none`: the gateway has no cache at all (the baseline of the ratios). Texts are "
        "captions of mixed length; images are 640×480 JPEG photos. Hit rates are the "
        "gateway's own `clip_cache_hits_total` per call, by level (LRU / Redis). Each "
        f"point: ≥ {args.seconds:g} s and ≥ 2 rounds of calls after one warm-up round.",
        "",
        "## Points",
        "",
        md_table(headers, point_rows),
        "",
        "## Ratios against no cache (same input, same concurrency)",
        "",
        "req/s above 1× is faster; latency below 1× is faster.",
        "",
        md_table(
            ["cache", "input", "state", "concurrency", "req/s ratio", "p50 ratio", "p99 ratio"],
            ratio_rows,
        ),
        "",
    ]
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="clip-demo-shapes", choices=("clip-demo-shapes", "ViT-B-32")
    )
    parser.add_argument("--seconds", type=float, default=None, help="per point (default 3)")
    parser.add_argument("--concurrency", default="1,16", help="concurrencies to measure")
    parser.add_argument("--quick", action="store_true", help="1.5 s points")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "cache.md")
    add_threading_arguments(parser)
    args = parser.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else (1.5 if args.quick else 3.0)
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    return args


async def run(args: argparse.Namespace) -> int:
    from service.processes.redis_server import RedisServer

    section(f"cache: {args.model}")
    info = machine_info()
    info.append(("threads", threading_note(args.torch_threads)))
    repository = model_repository(args.model)
    jpegs = photo_pool(64, (640, 480), seed=1)
    offsets = itertools.count(0, 1_000_000)
    rows: list[Row] = []
    with RedisServer() as redis:
        for setup in SETUPS:
            section(f"gateway with {setup.name}")
            settings: dict[str, object] = {
                "local_cache_items": setup.local_items,
                "redis_url": redis.url if setup.redis else "",
                "torch_threads": args.torch_threads,
            }
            with GatewayProcess(repository, log_name=setup.name, **settings) as gateway:
                rows += await measure_setup(setup, gateway, jpegs, args, offsets)
    text = report(rows, args, info)
    write_result(args.out, text, text.split("## Ratios", 1)[1])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(argv, parse_args, run, "bench.cache")


if __name__ == "__main__":
    sys.exit(main())
