"""A load run: N concurrent callers for T seconds of mixed RPCs against one gateway.

    python -m bench.load                                   # starts its own demo gateway
    python -m bench.load --redis --triton --seconds 30     # ... with redis-server, tritonserver
    python -m bench.load --target 127.0.0.1:50051 --pid 1234 --api-key K

The mix per call: EmbedText 40 %, EmbedImage 25 %, Classify 20 %, Similarity 10 %,
EmbedStream 5 % (16 items each). About 30 % of the texts and images repeat from a
small hot set, as popular queries do, so caches see hits; the rest are new. Prints
requests/s, p50/p95/p99 per RPC, errors by gRPC code, and the gateway's memory at
start and end (its own process when this script starts it; `--pid` otherwise).

Bounded: at most 1024 callers, one hour, `--max-requests` calls if given, every call
with a deadline; only loopback targets are accepted. Writes bench/results/load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import os
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from bench.common import (
    RESULTS_DIR,
    add_threading_arguments,
    channel_options,
    fmt,
    machine_info,
    md_table,
    memory_mb,
    mixed_caption,
    model_repository,
    photo_pool,
    run_benchmark,
    section,
    short_caption,
    threading_note,
    unique_jpeg,
    write_result,
)
from service.api.clip.v1 import clip_pb2
from service.processes.gateway import GatewayProcess, wait_serving

MAX_CALLERS = 1024
MAX_SECONDS = 3600.0
WORKLOAD = (
    ("EmbedText", 40),
    ("EmbedImage", 25),
    ("Classify", 20),
    ("Similarity", 10),
    ("EmbedStream", 5),
)
HOT = 64  # size of the set of repeated inputs
HOT_SHARE = 0.3
STREAM_ITEMS = 16
PACKED = clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES
LABEL_SETS = (
    ("red circle", "blue star", "green square", "yellow triangle", "purple hexagon",
     "orange heart", "white cross", "black diamond"),
    ("a dog", "a cat", "a horse", "a bird", "a cow", "a sheep", "a bear", "a zebra",
     "a giraffe", "an elephant", "a mouse", "a rabbit"),
    ("a car", "a bus", "a train", "a boat", "a plane", "a bike", "a truck", "a motorcycle",
     "a tractor", "a scooter"),
    ("a beach", "a forest", "a city street", "a kitchen", "a mountain", "a desert",
     "a living room", "an office", "a park", "a snowy field", "a river", "a market",
     "a stadium", "a library", "a farm", "a harbour"),
)  # fmt: skip


@dataclass
class RpcStats:
    """Outcomes of one RPC."""

    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    items: int = 0
    item_errors: Counter[str] = field(default_factory=Counter)

    def p(self, q: float) -> float:
        """Latency percentile in ms."""
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_s), q) * 1000.0)


@dataclass
class Memory:
    """Resident memory samples of the gateway (and Triton, when this script started it)."""

    gateway: list[float] = field(default_factory=list)
    triton: list[float] = field(default_factory=list)
    peak_gateway: float = float("nan")
    cpu_seconds: tuple[float, float] = (float("nan"), float("nan"))


# ---------------------------------------------------------------------------- targets
def check_loopback(target: str) -> None:
    """Refuse any target that is not a loopback address (this is a load generator)."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--target must be HOST:PORT, not {target!r}")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise SystemExit(f"cannot resolve {host!r}: {exc}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_loopback:
            raise SystemExit(f"{target} resolves to {address}: only loopback targets are allowed")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_rss_mb(pgid: int) -> float:
    """Summed RSS of a process group (tritonserver and its python stubs)."""
    from service.processes.child_server import group_members

    total = 0.0
    for pid in group_members(pgid):
        with contextlib.suppress(OSError):
            total += memory_mb(pid)[0]
    return total


# ---------------------------------------------------------------------------- the mix
class Workload:
    """Builds each RPC's request; `n` (never repeated) makes fresh inputs distinct."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]]):
        self.metadata = tuple(metadata)
        self.jpegs = photo_pool(HOT, (640, 480), seed=7)
        prefix = "/clip.v1.ClipService/"
        self.unary = {
            name: channel.unary_unary(prefix + name)
            for name in ("EmbedText", "EmbedImage", "Classify", "Similarity")
        }
        self.stream = channel.stream_stream(
            prefix + "EmbedStream",
            request_serializer=clip_pb2.StreamRequest.SerializeToString,
            response_deserializer=clip_pb2.StreamResponse.FromString,
        )

    def text(self, rng: random.Random, n: int) -> str:
        if rng.random() < HOT_SHARE:
            return short_caption(rng.randrange(HOT))
        return mixed_caption(n)

    def image(self, rng: random.Random, n: int) -> bytes:
        if rng.random() < HOT_SHARE:
            h = rng.randrange(HOT)
            return unique_jpeg(self.jpegs[h], -1 - h)  # always the same bytes for one h
        return unique_jpeg(self.jpegs[n % HOT], n)

    async def call(
        self, name: str, rng: random.Random, n: int, deadline_s: float, stats: RpcStats
    ) -> None:
        """One RPC; raises grpc.aio.AioRpcError on a failed call."""
        if name == "EmbedStream":
            await self._stream(rng, n, deadline_s, stats)
            return
        request: object
        if name == "EmbedText":
            count = rng.randint(1, 4)
            texts = [self.text(rng, n * 8 + k) for k in range(count)]
            request = clip_pb2.EmbedTextRequest(texts=texts, format=PACKED)
        elif name == "EmbedImage":
            count = rng.randint(1, 2)
            images = [self.image(rng, n * 8 + k) for k in range(count)]
            request = clip_pb2.EmbedImageRequest(images=images, format=PACKED)
        elif name == "Classify":
            count = 1
            request = clip_pb2.ClassifyRequest(
                images=[self.image(rng, n * 8)], labels=list(rng.choice(LABEL_SETS)), top_k=3
            )
        else:  # Similarity: 2 text queries against 3 images
            count = 5
            request = clip_pb2.SimilarityRequest(
                queries=[clip_pb2.Item(text=self.text(rng, n * 8 + k)) for k in range(2)],
                candidates=[clip_pb2.Item(image=self.image(rng, n * 8 + 2 + k)) for k in range(3)],
            )
        payload = request.SerializeToString()  # type: ignore[attr-defined]
        await self.unary[name](payload, timeout=deadline_s, metadata=self.metadata)
        stats.items += count

    async def _stream(self, rng: random.Random, n: int, deadline_s: float, stats: RpcStats) -> None:
        async def requests() -> AsyncIterator[clip_pb2.StreamRequest]:
            for k in range(STREAM_ITEMS):
                if k % 4 == 3:
                    yield clip_pb2.StreamRequest(
                        id=str(k), image=self.image(rng, n * 32 + k), format=PACKED
                    )
                else:
                    yield clip_pb2.StreamRequest(
                        id=str(k), text=self.text(rng, n * 32 + k), format=PACKED
                    )

        call = self.stream(requests(), timeout=deadline_s, metadata=self.metadata)
        async for answer in call:
            if answer.WhichOneof("result") == "error":
                stats.item_errors[answer.error.code] += 1
            else:
                stats.items += 1


# ---------------------------------------------------------------------------- the run
async def drive(
    target: str,
    args: argparse.Namespace,
    pid: int | None,
    triton_pgid: int | None,
) -> tuple[dict[str, RpcStats], float, Memory]:
    """Run the callers; returns stats per RPC, the wall time, and memory samples."""
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    stats = {name: RpcStats() for name, _ in WORKLOAD}
    names = [name for name, _ in WORKLOAD]
    weights = [w for _, w in WORKLOAD]
    counter = itertools.count()
    issued = 0
    memory = Memory()

    def sample_memory() -> None:
        if pid is not None:
            with contextlib.suppress(OSError):
                rss, peak = memory_mb(pid)
                memory.gateway.append(rss)
                memory.peak_gateway = peak
        if triton_pgid is not None:
            memory.triton.append(group_rss_mb(triton_pgid))

    # Several connections, as several client processes would open.
    channels = [
        grpc.aio.insecure_channel(target, options=channel_options()) for _ in range(args.channels)
    ]
    workloads = [Workload(c, metadata) for c in channels]
    sample_memory()
    cpu_start = cpu_seconds(pid) if pid is not None else float("nan")
    started = time.perf_counter()
    stop_at = started + args.seconds
    bar = tqdm(total=int(args.seconds), desc="load", unit="s", disable=None, leave=False)

    async def caller(k: int) -> None:
        nonlocal issued
        rng = random.Random(1000 + k)
        workload = workloads[k % len(workloads)]
        while time.perf_counter() < stop_at:
            if args.max_requests and issued >= args.max_requests:
                return
            issued += 1
            name = rng.choices(names, weights)[0]
            begin = time.perf_counter()
            try:
                await workload.call(name, rng, next(counter), args.deadline_s, stats[name])
            except grpc.aio.AioRpcError as exc:
                stats[name].errors[exc.code().name] += 1
            else:
                stats[name].latencies_s.append(time.perf_counter() - begin)

    async def monitor() -> None:
        while True:
            await asyncio.sleep(1.0)
            sample_memory()
            elapsed = time.perf_counter() - started
            ok = sum(len(s.latencies_s) for s in stats.values())
            errors = sum(sum(s.errors.values()) for s in stats.values())
            bar.n = min(int(elapsed), bar.total)
            rss = f", gateway RSS {memory.gateway[-1]:.0f} MB" if memory.gateway else ""
            bar.set_postfix_str(f"{ok / elapsed:.1f} req/s, {errors} errors{rss}")

    watcher = asyncio.get_running_loop().create_task(monitor())
    try:
        await asyncio.gather(*(caller(k) for k in range(args.callers)))
    finally:
        watcher.cancel()
        bar.close()
        elapsed = time.perf_counter() - started
        for channel in channels:
            await channel.close()
    if pid is not None:
        with contextlib.suppress(OSError):
            memory.cpu_seconds = (cpu_start, cpu_seconds(pid))
    sample_memory()
    return stats, elapsed, memory


def report(
    args: argparse.Namespace,
    stats: dict[str, RpcStats],
    elapsed: float,
    memory: Memory,
    info: list[tuple[str, str]],
    target_note: str,
) -> str:
    """The Markdown report."""
    rows = []
    for name, s in stats.items():
        calls = len(s.latencies_s) + sum(s.errors.values())
        errors = ", ".join(f"{k}×{v}" for k, v in sorted(s.errors.items())) or "0"
        if s.item_errors:
            errors += "; stream items: " + ", ".join(
                f"{k}×{v}" for k, v in sorted(s.item_errors.items())
            )
        rows.append(
            [
                name, calls, fmt(len(s.latencies_s) / elapsed), fmt(s.items / elapsed),
                fmt(s.p(50)), fmt(s.p(95)), fmt(s.p(99)), errors,
            ]
        )  # fmt: skip
    everything = RpcStats()
    for s in stats.values():
        everything.latencies_s += s.latencies_s
        everything.errors.update(s.errors)
        everything.items += s.items
    total_calls = len(everything.latencies_s) + sum(everything.errors.values())
    rows.append(
        [
            "**all**", total_calls, fmt(len(everything.latencies_s) / elapsed),
            fmt(everything.items / elapsed), fmt(everything.p(50)), fmt(everything.p(95)),
            fmt(everything.p(99)),
            ", ".join(f"{k}×{v}" for k, v in sorted(everything.errors.items())) or "0",
        ]
    )  # fmt: skip
    mem_rows = []
    if memory.gateway:
        g = memory.gateway
        mem_rows.append(["gateway", fmt(g[0]), fmt(g[-1]), fmt(max(g)), fmt(memory.peak_gateway)])
    if memory.triton:
        t = memory.triton
        mem_rows.append(["tritonserver + stubs", fmt(t[0]), fmt(t[-1]), fmt(max(t)), "–"])
    cpu_start, cpu_end = memory.cpu_seconds
    cpu_line = (
        f"Gateway CPU: {cpu_end - cpu_start:.1f} s in {elapsed:.1f} s of wall time "
        f"({(cpu_end - cpu_start) / elapsed:.2f} cores on average)."
        if cpu_end == cpu_end
        else ""
    )
    parts = [
        "# Load run",
        "",
        md_table(["", ""], info),
        "",
        f"{target_note} {args.callers} callers over {args.channels} connections for "
        f"{elapsed:.1f} s (asked {args.seconds:g} s), call deadline {args.deadline_s:g} s. Mix: "
        + ", ".join(f"{n} {w} %" for n, w in WORKLOAD)
        + f"; EmbedText 1–4 texts, EmbedImage 1–2 640×480 JPEGs, Classify 1 image against "
        f"8–16 labels (default templates, top 3), Similarity 2 texts × 3 images, EmbedStream "
        f"{STREAM_ITEMS} items (¾ texts); {HOT_SHARE:.0%} of inputs come from a hot set of "
        f"{HOT}. `items/s` counts texts and images sent.",
        "",
        md_table(
            ["RPC", "calls", "ok/s", "items/s", "p50 ms", "p95 ms", "p99 ms", "errors by code"],
            rows,
        ),
        "",
    ]
    if mem_rows:
        parts += [
            "Resident memory (MB), sampled every second:",
            "",
            md_table(["process", "start", "end", "max sampled", "peak (VmHWM)"], mem_rows),
            "",
        ]
    if cpu_line:
        parts += [cpu_line, ""]
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", help="HOST:PORT of a running gateway (loopback only)")
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--api-key", help="sent as `authorization: Bearer KEY`")
    parser.add_argument("--pid", type=int, help="process id of the --target gateway (for RSS)")
    parser.add_argument("--channels", type=int, default=4, help="gRPC connections to spread over")
    parser.add_argument("--deadline-s", type=float, default=30.0, help="deadline of each call")
    parser.add_argument("--max-requests", type=int, default=0, help="stop after this many calls")
    parser.add_argument("--redis", action="store_true", help="self-started: a real redis-server")
    parser.add_argument("--triton", action="store_true", help="self-started: a real tritonserver")
    parser.add_argument(
        "--model", default="clip-demo-shapes", choices=("clip-demo-shapes", "ViT-B-32")
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "load.md")
    add_threading_arguments(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.callers <= MAX_CALLERS:
        parser.error(f"--callers must be 1..{MAX_CALLERS}")
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS:g}]")
    if not 1 <= args.channels <= 64:
        parser.error("--channels must be 1..64")
    if args.target and (args.redis or args.triton):
        parser.error("--redis/--triton start servers for a self-started gateway, not a --target")
    return args


async def run(args: argparse.Namespace) -> int:
    section("load")
    info = machine_info()
    if args.target:
        check_loopback(args.target)
        wait_serving(args.target, 30.0)
        note = f"Target {args.target} (started elsewhere{f', pid {args.pid}' if args.pid else ''})."
        stats, elapsed, memory = await drive(args.target, args, args.pid, None)
    else:
        stats, elapsed, memory, note = await self_started(args, info)
    text = report(args, stats, elapsed, memory, info, note)
    write_result(args.out, text, text.split("\n\n", 2)[2])
    return 0


async def self_started(
    args: argparse.Namespace, info: list[tuple[str, str]]
) -> tuple[dict[str, RpcStats], float, Memory, str]:
    """Start redis-server / tritonserver if asked, and a gateway; run the load against it."""
    repository = model_repository(args.model)
    info.append(("threads", threading_note(args.torch_threads)))
    with contextlib.ExitStack() as stack:
        settings: dict[str, object] = {"torch_threads": args.torch_threads}
        parts = [f"Self-started gateway ({args.model}, embedded LRU cache"]
        if args.redis:
            from service.processes.redis_server import RedisServer

            redis = stack.enter_context(RedisServer())
            settings["redis_url"] = redis.url
            parts.append(" + real redis-server")
        triton_pgid: int | None = None
        if args.triton:
            from service.processes.triton_server import TritonProcess

            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-triton-"))
            triton = stack.enter_context(
                TritonProcess(repository, workdir=Path(workdir), startup_timeout_s=300)
            )
            settings.update(backend="triton", triton_url=triton.grpc_url)
            triton_pgid = triton.pid
            parts.append(", backend: real tritonserver")
        else:
            parts.append(", backend: embedded")
        if args.api_key:
            keydir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-keys-"))
            keyfile = Path(keydir) / "keys"
            keyfile.write_text(args.api_key + "\n")
            settings["api_keys_file"] = keyfile
            parts.append(", API keys on")
        gateway = stack.enter_context(GatewayProcess(repository, log_name="load", **settings))
        note = "".join(parts) + f"; pid {gateway.pid})."
        print(f"  gateway {gateway.target} pid {gateway.pid}", flush=True)
        stats, elapsed, memory = await drive(gateway.target, args, gateway.pid, triton_pgid)
        if not gateway.running:
            note += " The gateway process DIED during the run; see its log."
    return stats, elapsed, memory, note


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(argv, parse_args, run, "bench.load")


if __name__ == "__main__":
    sys.exit(main())
