"""Cached against uncached EmbedText and EmbedImage through the gateway, in one run.

    python -m bench.cache                       # demo model, LRU and a real redis-server
    python -m bench.cache --model ViT-B-32 --seconds 1.5

What it measures and how: bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from bench import harness as h
from bench.captions import mixed_caption
from service.processes.metric_samples import scrape

WARM_SET = 64  # more than the highest concurrency: concurrent hits never share a key
#: (name, in-process LRU items, Redis on)
SETUPS = (
    ("no cache", 0, False), ("LRU", 10_000, False),
    ("Redis", 0, True), ("LRU + Redis", 10_000, True),
)  # fmt: skip
HEADERS = [
    "cache", "input", "state", "concurrency", "req/s", "p50 ms", "p99 ms",
    "hit rate LRU / Redis", "cache errors", "call errors",
]  # fmt: skip


def cache_counters(metrics_port: int) -> dict[str, float]:
    """Hits per level and errors so far."""
    samples = scrape(metrics_port)
    errors = sum(v for k, v in samples.items() if k.startswith("clip_cache_errors_total"))
    hits = {
        lv: samples.get(f'clip_cache_hits_total{{level="{lv}"}}', 0.0) for lv in ("local", "redis")
    }
    return hits | {"errors": errors}


async def measure(setup: str, gateway: h.GatewayProcess, args: argparse.Namespace) -> list[list]:
    """Misses then hits (plain calls for `no cache`) of both modalities: a row each."""
    rows = []
    async with h.channel(gateway.target) as channel:
        for modality, state, concurrency in itertools.product(
            ("text", "image"),
            ("none",) if setup == "no cache" else ("miss", "hit"),
            args.concurrencies,
        ):
            # Each point gets inputs of its own: no point warms another's cache.
            offset, warm = next(args.offsets), state == "hit"
            calls = h.grpc_calls(
                h.RawClip(channel), args.jpegs, mixed_caption, timeout_s=120,
                pick=lambda i, o=offset, w=warm: o + (i % WARM_SET if w else WARM_SET + i),
            )  # fmt: skip
            for i in range(WARM_SET if warm else 0):  # fill the cache with the warm set
                await calls[modality](i)
            result = await h.closed_loop(
                calls[modality], label=f"{setup} {modality} {state} c{concurrency}",
                concurrency=concurrency, seconds=args.seconds, min_calls=2 * concurrency,
                counters=lambda: cache_counters(gateway.metrics_port),
            )  # fmt: skip
            change, ok = result.counters, max(len(result.latencies_s), 1)
            hits = f"{change['local'] / ok:.0%} / {change['redis'] / ok:.0%}"
            rows.append(
                [setup, modality, state, concurrency, result, hits, f"{change['errors']:.0f}"]
            )
            print("  " + " | ".join(map(str, fmt_row(rows[-1]))), flush=True)
    return rows


def fmt_row(row: list) -> list:
    """A measured row as the table shows it."""
    *key, r, hits, cache_errors = row
    p50, p99 = (h.fmt(r.percentile_ms(q), 2) for q in (50, 99))
    return [*key, h.fmt(r.calls_per_s), p50, p99, hits, cache_errors, r.error_text]


def ratio_rows(rows: list[list]) -> list[list]:
    """Each cached point ÷ `no cache` at the same input and concurrency."""
    base = {(r[1], r[3]): r[4] for r in rows if r[0] == "no cache"}
    out = []
    for setup, modality, state, concurrency, r, *_ in rows:
        b = base.get((modality, concurrency))
        if setup != "no cache" and b is not None:
            pairs = (
                (r.calls_per_s, b.calls_per_s),
                *((r.percentile_ms(q), b.percentile_ms(q)) for q in (50, 99)),
            )
            out.append([setup, modality, state, concurrency, *(f"{x / y:.2f}×" for x, y in pairs)])
    return out


async def run(args: argparse.Namespace) -> int:
    h.section(f"cache: {args.model}")
    info = h.machine_info(args.torch_threads)
    repository = h.model_repository(args.model)
    args.jpegs, args.offsets = h.photo_pool(64, seed=1), itertools.count(0, 1_000_000)
    rows: list[list] = []
    with h.redis() as redis:
        for name, local_items, with_redis in SETUPS:
            h.section(f"gateway with {name}")
            settings = dict(
                local_cache_items=local_items, redis_url=redis.url if with_redis else ""
            )
            with h.gateway(repository, name, torch_threads=args.torch_threads, **settings) as gw:
                rows += await measure(name, gw, args)
    headers = ["cache", "input", "state", "concurrency", "req/s ratio", "p50 ratio", "p99 ratio"]
    ratios = h.md_table(headers, ratio_rows(rows))
    text = h.report(f"Cache: {args.model}", info, {
        "Points": h.md_table(HEADERS, [fmt_row(r) for r in rows]),
        "Ratios against no cache (same input, same concurrency)": [
            "req/s above 1× is faster; latency below 1× is faster.", "", ratios],
    }, intro=f"Single-item calls through a gateway in its own process; `miss`: every input new, "
       f"`hit`: a warm set of {WARM_SET} inputs, `none`: no cache (the ratios' baseline). Hit "
       f"rates: the gateway's `clip_cache_hits_total` per call (LRU / Redis). Each point ≥ "
       f"{args.seconds:g} s after a warm-up round; the setups: bench/README.md (cache).",
    )  # fmt: skip
    h.write_result(args.out, text, ratios)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = h.parser(__doc__, out="cache.md")
    p.add_argument("--seconds", type=float, default=3.0, help="per point")
    p.add_argument("--concurrency", default="1,16", help="concurrencies to measure")
    args = p.parse_args(argv)
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    return args


if __name__ == "__main__":
    sys.exit(h.main("bench.cache", parse_args(), run))
