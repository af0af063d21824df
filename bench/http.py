"""HTTP (`/v1/embeddings`) against gRPC (`EmbedText`) for single-text calls, in one run.

    python -m bench.http                     # demo model, 32 callers, 3 rounds of 5 s
    python -m bench.http --rounds 5 --seconds 10

What it measures and how: bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import aiohttp

from bench import harness as h
from bench.captions import mixed_caption

WARM_SET = 64
TRANSPORTS = ("grpc", "http")
POINT_HEADERS = ["req/s", "p50 ms", "p99 ms", "errors"]


async def measure(gateway: h.GatewayProcess, args: argparse.Namespace) -> list[dict]:
    """Rounds of both states × both transports; returns each round's results by point."""
    offsets = itertools.count(1_000_000, 1_000_000)
    url = f"http://{gateway.host}:{gateway.http_port}/v1/embeddings"
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with (
        h.channel(gateway.target) as channel,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        client = h.RawClip(channel)
        warm = h.grpc_calls(client, [], mixed_caption, pick=lambda i: i % WARM_SET)["text"]
        for i in range(WARM_SET):  # the warm set, in the LRU for both transports
            await warm(i)

        async def point(n: int, name: str) -> h.LoadResult:
            transport, state = name.split()
            offset = next(offsets)
            pick = (lambda i: i % WARM_SET) if state == "hit" else (lambda i: offset + i)
            call = (
                h.grpc_calls(client, [], mixed_caption, pick=pick, timeout_s=60)["text"]
                if transport == "grpc"
                else h.http_text_call(session, url, lambda i: mixed_caption(pick(i)))
            )
            result = await h.closed_loop(
                call, label=f"round {n} {state} {transport}", concurrency=args.concurrency,
                seconds=args.seconds, min_calls=2 * args.concurrency,
            )  # fmt: skip
            print(f"  round {n} {state:<4} {transport:<4} {' '.join(map(str, row(result)))}")
            return result

        names = [f"{t} {s}" for s in ("miss", "hit") for t in TRANSPORTS]
        return await h.interleaved(args.rounds, names, point)


def row(r: h.LoadResult) -> list[str]:
    """req/s, p50, p99, errors."""
    p50, p99 = (h.fmt(r.percentile_ms(q), 2) for q in (50, 99))
    return [h.fmt(r.calls_per_s), p50, p99, r.error_text]


def summary(rounds: list[dict]) -> list[list[object]]:
    """Per state: median req/s and p50 of each transport, and the median per-round ratios."""
    rows: list[list[object]] = []
    for state in ("miss", "hit"):
        rps = {t: [r[f"{t} {state}"].calls_per_s for r in rounds] for t in TRANSPORTS}
        p50 = {t: [r[f"{t} {state}"].percentile_ms(50) for r in rounds] for t in TRANSPORTS}
        ratio = [[a / b for a, b in zip(v["http"], v["grpc"], strict=True)] for v in (rps, p50)]
        med = statistics.median
        rows.append([
            state, h.fmt(med(rps["grpc"])), h.fmt(med(rps["http"])), h.spread(ratio[0]),
            h.fmt(med(p50["grpc"]), 2), h.fmt(med(p50["http"]), 2), h.spread(ratio[1]),
        ])  # fmt: skip
    return rows


async def run(args: argparse.Namespace) -> int:
    h.section(f"HTTP vs gRPC: {args.model}")
    info = h.machine_info()
    with h.gateway(h.model_repository(args.model), "http-bench") as gateway:
        rounds = await measure(gateway, args)
    headers = [
        "state", "gRPC req/s", "HTTP req/s", "HTTP ÷ gRPC req/s (range)",
        "gRPC p50 ms", "HTTP p50 ms", "HTTP ÷ gRPC p50 (range)",
    ]  # fmt: skip
    medians = h.md_table(headers, summary(rounds))
    points = [
        [n, *name.split()[::-1], *row(r)]
        for n, rr in enumerate(rounds, 1)
        for name, r in rr.items()
    ]
    text = h.report(f"HTTP vs gRPC: single-text calls, {args.model}", info, {
        "Medians": medians,
        "Every point": h.md_table(["round", "state", "transport", *POINT_HEADERS], points),
    }, intro=f"{args.concurrency} closed-loop callers; {args.rounds} interleaved rounds of ≥ "
       f"{args.seconds:g} s per transport and state. `miss`: every text new; `hit`: a warm set of "
       f"{WARM_SET} texts in the LRU (mostly transport). Ratios are per round, the table gives "
       "their median (and range); the setup: bench/README.md (http).",
    )  # fmt: skip
    h.write_result(args.out, text, medians)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = h.parser(__doc__, out="http-vs-grpc.md", threads=False)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--seconds", type=float, default=5.0, help="per point")
    p.add_argument("--concurrency", type=int, default=32, help="callers")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(h.main("bench.http", parse_args(), run))
