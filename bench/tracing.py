"""What tracing costs: the spans of one call, off (no-op) and on (SDK, batching processor,
OTLP/gRPC to a receiver on loopback), and single-image calls/s through a gateway with
`--otlp-endpoint` against one without, interleaved.

    python -m bench.tracing                 # ~2 min on 2 cores (--rounds 2 --seconds 12)

What it measures and how: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench import harness as h
from bench.harness import model_repository, photo_pool, unique_jpeg
from bench.otlp import OtlpReceiver
from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.processes.gateway import GatewayProcess
from service.telemetry import NO_TRACER, SCOPE, build_tracer_provider

#: The spans of one single-image EmbedImage (server, then the pipeline's children).
CALL_SPANS = ("validate", "embed", "cache.lookup", "decode", "queue.wait", "backend", "cache.store")


class _Discard(SpanExporter):
    """An exporter that drops what it gets: the request path's cost without a receiver's."""

    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def encode_per_call_us(calls: int) -> float:
    """Microseconds to encode one call's spans as OTLP protobuf (the exporter thread's work)."""
    memory = InMemorySpanExporter()
    provider = build_tracer_provider("", "bench", memory)
    spans_per_call_us(provider.get_tracer(SCOPE), 1)
    spans = memory.get_finished_spans()
    started = time.perf_counter()
    for _ in range(calls):
        encode_spans(spans).SerializeToString()
    return (time.perf_counter() - started) / calls * 1e6


def serve_receiver(ports: multiprocessing.Queue, stop: multiprocessing.Event) -> None:  # type: ignore[type-arg]
    """A child process: an OTLP receiver until `stop` (so its parsing is not this process's)."""
    with OtlpReceiver() as receiver:
        ports.put(receiver.grpc_endpoint)
        stop.wait()
        ports.put(len(receiver.snapshot()))


def spans_per_call_us(tracer: trace.Tracer, calls: int) -> float:
    """Microseconds of tracer work per call: one SERVER span and its children."""
    started = time.perf_counter()
    for _ in range(calls):
        with tracer.start_as_current_span("clip.v1.ClipService/EmbedImage", attributes={"a": 1}):
            for name in CALL_SPANS:
                with tracer.start_as_current_span(name, attributes={"clip.items": 1}) as span:
                    span.set_attribute("clip.batch_size", 1)
    return (time.perf_counter() - started) / calls * 1e6


async def calls_per_s(target: str, pool: list[bytes], seconds: float, callers: int) -> float:
    """Single-image EmbedImage calls per second from `callers` closed-loop callers."""
    async with h.channel(target) as channel:
        stub = clip_pb2_grpc.ClipServiceStub(channel)

        async def call(i: int) -> int:
            image = unique_jpeg(pool[i % len(pool)], i)
            await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[image]), timeout=120)
            return 1

        result = await h.closed_loop(
            call, label="calls", concurrency=callers, seconds=seconds, warmup_rounds=0
        )
    return result.calls_per_s


async def run(args: argparse.Namespace) -> int:
    """Both measurements; the Markdown report."""
    lines = ["# Tracing: what it costs", ""]
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Discard()))
    on = provider.get_tracer(SCOPE)
    off_us = statistics.median(spans_per_call_us(NO_TRACER, 2000) for _ in range(5))
    on_us = statistics.median(spans_per_call_us(on, 2000) for _ in range(5))
    provider.shutdown()
    encode_us = statistics.median(encode_per_call_us(2000) for _ in range(3))
    ports: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    stop = multiprocessing.Event()
    child = multiprocessing.Process(target=serve_receiver, args=(ports, stop), daemon=True)
    child.start()
    endpoint = ports.get(timeout=60)
    try:
        repository = model_repository("clip-demo-shapes")
        pool = photo_pool(32, (640, 480), seed=3)
        gateways = {
            name: GatewayProcess(
                repository, log_name=f"gateway-{name}", local_cache_items=0, **otlp
            )
            for name, otlp in (("off", {}), ("on", {"otlp_endpoint": endpoint}))
        }
        rates: dict[str, list[float]] = {name: [] for name in gateways}
        try:
            for gateway in gateways.values():
                gateway.start()
            for r in range(args.rounds):
                for name, gateway in gateways.items():
                    rate = await calls_per_s(gateway.target, pool, args.seconds, args.callers)
                    rates[name].append(rate)
                    print(f"round {r + 1} tracing {name}: {rate:.1f} calls/s", flush=True)
        finally:
            for gateway in gateways.values():
                gateway.close()
    finally:
        stop.set()
        received = ports.get(timeout=60)
        child.join(30)
    off_rate, on_rate = statistics.median(rates["off"]), statistics.median(rates["on"])
    lines += [
        f"`python -m bench.tracing --rounds {args.rounds} --seconds {args.seconds} --callers "
        f"{args.callers}`, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, 2 shared CPUs.",
        "",
        "| measure | tracing off | tracing on | on ÷ off |",
        "| --- | --- | --- | --- |",
        f"| tracer CPU per call on the request path (8 spans, µs) | {off_us:.1f} | {on_us:.1f} "
        "| – |",
        f"| OTLP encoding of one call's spans (exporter thread, µs) | – | {encode_us:.1f} | – |",
        f"| single-image calls/s, {args.callers} callers (median of {args.rounds}) "
        f"| {off_rate:.1f} | {on_rate:.1f} | {on_rate / off_rate:.2f} |",
        "",
        "Per round (calls/s): "
        + "; ".join(
            f"{name}: {', '.join(f'{v:.1f}' for v in vals)}" for name, vals in rates.items()
        ),
        f"; the receiver got {received} spans.",
    ]
    h.write_result(args.out, "\n".join(lines) + "\n", "\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run."""
    parser = h.parser(__doc__, out="tracing.md", model=None, threads=False)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--callers", type=int, default=8)
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
