"""What tracing costs: the spans of one call, off (no-op) and on (SDK, batching processor,
OTLP/gRPC to a receiver on loopback), and single-image calls/s through a gateway with
`--otlp-endpoint` against one without, interleaved.

    python -m bench.tracing                 # ~2 min on 2 cores (--rounds 2 --seconds 12)

What it measures and how: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench import harness as h
from bench.otlp import OtlpReceiver
from service.telemetry import NO_TRACER, SCOPE, build_tracer_provider

#: The spans of one single-image EmbedImage (server, then the pipeline's children).
CALL_SPANS = ("validate", "embed", "cache.lookup", "decode", "queue.wait", "backend", "cache.store")


class _Discard(SpanExporter):
    """An exporter that drops what it gets: the request path's cost without a receiver's."""

    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def spans_per_call_us(tracer: trace.Tracer, calls: int) -> float:
    """Microseconds of tracer work per call: one SERVER span and its children."""
    started = time.perf_counter()
    for _ in range(calls):
        with tracer.start_as_current_span("clip.v1.ClipService/EmbedImage", attributes={"a": 1}):
            for name in CALL_SPANS:
                with tracer.start_as_current_span(name, attributes={"clip.items": 1}) as span:
                    span.set_attribute("clip.batch_size", 1)
    return (time.perf_counter() - started) / calls * 1e6


def encode_per_call_us(calls: int) -> float:
    """Microseconds to encode one call's spans as OTLP protobuf (the exporter thread's work)."""
    memory = InMemorySpanExporter()
    spans_per_call_us(build_tracer_provider("", "bench", memory).get_tracer(SCOPE), 1)
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


async def calls_per_s(target: str, pool: list[bytes], seconds: float, callers: int) -> float:
    """Single-image EmbedImage calls per second from `callers` closed-loop callers."""
    async with h.channel(target) as channel:
        call = h.grpc_calls(h.RawClip(channel), pool, timeout_s=120)["image"]
        result = await h.closed_loop(
            call, label="calls", concurrency=callers, seconds=seconds, warmup_rounds=0
        )
    return result.calls_per_s


async def run(args: argparse.Namespace) -> int:
    """Both measurements; the Markdown report."""
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Discard()))
    off_us, on_us = (
        statistics.median(spans_per_call_us(tracer, 2000) for _ in range(5))
        for tracer in (NO_TRACER, provider.get_tracer(SCOPE))
    )
    provider.shutdown()
    encode_us = statistics.median(encode_per_call_us(2000) for _ in range(3))
    ports: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    stop = multiprocessing.Event()
    child = multiprocessing.Process(target=serve_receiver, args=(ports, stop), daemon=True)
    child.start()
    endpoint = ports.get(timeout=60)
    try:
        repository, pool = h.model_repository(h.DEMO_MODEL), h.photo_pool(32, seed=3)
        with contextlib.ExitStack() as stack:
            gateways = {
                name: stack.enter_context(
                    h.gateway(repository, f"gateway-{name}", local_cache_items=0, **otlp)
                )
                for name, otlp in (("off", {}), ("on", {"otlp_endpoint": endpoint}))
            }
            rates: dict[str, list[float]] = {name: [] for name in gateways}
            for r in range(args.rounds):
                for name, gateway in gateways.items():
                    rate = await calls_per_s(gateway.target, pool, args.seconds, args.callers)
                    rates[name].append(rate)
                    print(f"round {r + 1} tracing {name}: {rate:.1f} calls/s", flush=True)
    finally:
        stop.set()
        received = ports.get(timeout=60)
        child.join(30)
    off_rate, on_rate = statistics.median(rates["off"]), statistics.median(rates["on"])
    per_round = "; ".join(
        f"{name}: {', '.join(f'{v:.1f}' for v in vs)}" for name, vs in rates.items()
    )
    rows = [
        ["tracer CPU per call on the request path (8 spans, µs)",
         f"{off_us:.1f}", f"{on_us:.1f}", "–"],
        ["OTLP encoding of one call's spans (exporter thread, µs)", "–", f"{encode_us:.1f}", "–"],
        [f"single-image calls/s, {args.callers} callers (median of {args.rounds})",
         f"{off_rate:.1f}", f"{on_rate:.1f}", f"{on_rate / off_rate:.2f}"],
    ]  # fmt: skip
    text = "\n".join([
        "# Tracing: what it costs", "",
        f"`python -m bench.tracing --rounds {args.rounds} --seconds {args.seconds} --callers "
        f"{args.callers}`, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, 2 shared CPUs.",
        "", h.md_table(["measure", "tracing off", "tracing on", "on ÷ off"], rows), "",
        f"Per round (calls/s): {per_round}", f"; the receiver got {received} spans.",
    ])  # fmt: skip
    h.write_result(args.out, text + "\n", text)
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
