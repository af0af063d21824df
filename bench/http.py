"""HTTP (`/v1/embeddings`) against gRPC (`EmbedText`) for single-text calls, in one run.

    python -m bench.http                     # demo model, 32 callers, 3 rounds of 5 s
    python -m bench.http --rounds 5 --seconds 10

One gateway (its own process) serves both transports from the same pipeline. Each
round measures gRPC and HTTP back to back (the order alternates between rounds, so a
drift of the shared machine's load does not favour one), 32 callers each calling again
as soon as their answer arrives, in two states: `miss` (every text new: the whole
pipeline, tokenizer and forward pass included) and `hit` (a warm set of 64 texts in the
gateway's LRU: what is left is mostly the transport). The ratios are taken per round
and their median is reported. Both load generators send prepared bytes and do not parse
answers (gRPC: serialized `EmbedTextRequest`, packed float32 answers; HTTP: one keep-alive
aiohttp session, JSON with `encoding_format: base64`, the openai client's default), so
they cost as little CPU as they can beside the gateway on the same cores.
Writes bench/results/http-vs-grpc.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc

from bench.common import (
    RESULTS_DIR,
    LoadResult,
    RawClip,
    channel_options,
    closed_loop,
    fmt,
    machine_info,
    md_table,
    mixed_caption,
    model_repository,
    section,
)
from service.api.clip.v1 import clip_pb2
from service.processes.gateway import GatewayProcess

PACKED = clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES
WARM_SET = 64
TRANSPORTS = ("grpc", "http")


@dataclass(frozen=True)
class Point:
    """One measured (round, state, transport)."""

    round: int
    state: str
    transport: str
    result: LoadResult


def _text(state: str, i: int, offset: int) -> str:
    return mixed_caption(i % WARM_SET if state == "hit" else offset + i)


def grpc_call(client: RawClip, state: str, offset: int) -> Callable[[int], Awaitable[int]]:
    """One single-text EmbedText per call."""

    async def call(i: int) -> int:
        request = clip_pb2.EmbedTextRequest(texts=[_text(state, i, offset)], format=PACKED)
        await client.embed_text(request.SerializeToString(), timeout=60)
        return 1

    return call


class HttpFailed(grpc.aio.AioRpcError):
    """A non-200 answer, counted like a gRPC error by `closed_loop`."""

    def __init__(self, status: int) -> None:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if status == 429 else grpc.StatusCode.UNKNOWN
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), f"HTTP {status}")


def http_call(
    session: aiohttp.ClientSession, url: str, state: str, offset: int
) -> Callable[[int], Awaitable[int]]:
    """One single-text POST /v1/embeddings per call."""

    async def call(i: int) -> int:
        body = json.dumps(
            {"model": "clip", "input": _text(state, i, offset), "encoding_format": "base64"}
        ).encode()
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as response:
            await response.read()
            if response.status != 200:
                raise HttpFailed(response.status)
        return 1

    return call


async def measure(gateway: GatewayProcess, args: argparse.Namespace) -> list[Point]:
    """Every round: both states, both transports (order alternating by round)."""
    points: list[Point] = []
    offsets = itertools.count(1_000_000, 1_000_000)
    url = f"http://{gateway.host}:{gateway.http_port}/v1/embeddings"
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with (
        grpc.aio.insecure_channel(gateway.target, options=channel_options()) as channel,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        client = RawClip(channel)
        warm = grpc_call(client, "hit", 0)
        for i in range(WARM_SET):  # the warm set, in the LRU for both transports
            await warm(i)
        for round_ in range(args.rounds):
            order = TRANSPORTS if round_ % 2 == 0 else TRANSPORTS[::-1]
            for state in ("miss", "hit"):
                for transport in order:
                    offset = next(offsets)
                    call = (
                        grpc_call(client, state, offset)
                        if transport == "grpc"
                        else http_call(session, url, state, offset)
                    )
                    result = await closed_loop(
                        call,
                        label=f"round {round_ + 1} {state} {transport}",
                        concurrency=args.concurrency,
                        seconds=args.seconds,
                        min_calls=2 * args.concurrency,
                    )
                    points.append(Point(round_ + 1, state, transport, result))
                    print(
                        f"  round {round_ + 1} {state:<4} {transport:<4} "
                        f"{fmt(result.calls_per_s):>8} req/s, p50 "
                        f"{fmt(result.percentile_ms(50), 2)} ms, p99 "
                        f"{fmt(result.percentile_ms(99), 2)} ms, errors {result.error_text}",
                        flush=True,
                    )
    return points


def _spread(ratios: Sequence[float]) -> str:
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def summary(points: Sequence[Point]) -> list[list[object]]:
    """Per state: median req/s and p50 of each transport, and the median per-round ratios."""
    rows: list[list[object]] = []
    for state in ("miss", "hit"):
        by = {(p.round, p.transport): p.result for p in points if p.state == state}
        rounds = sorted({r for r, _ in by})
        rps = {t: [by[(r, t)].calls_per_s for r in rounds] for t in TRANSPORTS}
        p50 = {t: [by[(r, t)].percentile_ms(50) for r in rounds] for t in TRANSPORTS}
        throughput = [h / g for h, g in zip(rps["http"], rps["grpc"], strict=True)]
        latency = [h / g for h, g in zip(p50["http"], p50["grpc"], strict=True)]
        rows.append(
            [
                state,
                fmt(statistics.median(rps["grpc"])),
                fmt(statistics.median(rps["http"])),
                _spread(throughput),
                fmt(statistics.median(p50["grpc"]), 2),
                fmt(statistics.median(p50["http"]), 2),
                _spread(latency),
            ]
        )
    return rows


def report(points: Sequence[Point], args: argparse.Namespace, info: list[tuple[str, str]]) -> str:
    """Markdown: the medians and ratios, then every point."""
    headers = [
        "state", "gRPC req/s", "HTTP req/s", "HTTP ÷ gRPC req/s (range)",
        "gRPC p50 ms", "HTTP p50 ms", "HTTP ÷ gRPC p50 (range)",
    ]  # fmt: skip
    point_rows = [
        [
            p.round, p.state, p.transport, fmt(p.result.calls_per_s),
            fmt(p.result.percentile_ms(50), 2), fmt(p.result.percentile_ms(99), 2),
            p.result.error_text,
        ]
        for p in points
    ]  # fmt: skip
    return "\n".join(
        [
            f"# HTTP vs gRPC: single-text calls, {args.model}",
            "",
            md_table(["", ""], info),
            "",
            f"{args.concurrency} callers, each calling again as soon as its answer arrives; "
            f"{args.rounds} interleaved rounds of ≥ {args.seconds:g} s per transport and "
            "state (the order alternates by round). `miss`: every text is new (tokenizer and "
            f"forward pass included); `hit`: a warm set of {WARM_SET} texts in the LRU, so "
            "mostly transport. gRPC: `EmbedText` with packed float32 answers; HTTP: "
            "`POST /v1/embeddings` with `encoding_format: base64` on keep-alive connections. "
            "One gateway serves both; the load generators run on the same cores. Ratios "
            "are per round; the table gives their median (and range).",
            "",
            "## Medians",
            "",
            md_table(headers, summary(points)),
            "",
            "## Every point",
            "",
            md_table(
                ["round", "state", "transport", "req/s", "p50 ms", "p99 ms", "errors"], point_rows
            ),
            "",
        ]
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="clip-demo-shapes", choices=("clip-demo-shapes", "ViT-B-32")
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seconds", type=float, default=5.0, help="per point")
    parser.add_argument("--concurrency", type=int, default=32, help="callers")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "http-vs-grpc.md")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    section(f"HTTP vs gRPC: {args.model}")
    info = machine_info()
    repository = model_repository(args.model)
    with GatewayProcess(repository, log_name="http-bench") as gateway:
        points = await measure(gateway, args)
    text = report(points, args, info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    section("summary")
    print(text.split("## Medians", 1)[1].split("## Every point", 1)[0])
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
