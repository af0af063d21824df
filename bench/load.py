"""A load run: N concurrent callers for T seconds of mixed RPCs against one gateway.

    python -m bench.load                                   # starts its own demo gateway
    python -m bench.load --redis --triton --seconds 30     # ... with redis-server, tritonserver
    python -m bench.load --target 127.0.0.1:50051 --pid 1234 --api-key K

What it measures and how: bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import random
import socket
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from bench import harness as h
from bench.captions import mixed_caption, short_caption
from service.api.clip.v1 import clip_pb2 as pb
from service.processes.gateway import wait_serving

WORKLOAD = {"EmbedText": 40, "EmbedImage": 25, "Classify": 20, "Similarity": 10, "EmbedStream": 5}
HOT, HOT_SHARE, STREAM_ITEMS = 64, 0.3, 16
RPC_HEADERS = ["RPC", "calls", "ok/s", "items/s", "p50 ms", "p95 ms", "p99 ms", "errors by code"]
PACKED = pb.VECTOR_FORMAT_FLOAT32_BYTES
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
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise SystemExit(
                f"{target} resolves to {info[4][0]}: only loopback targets are allowed"
            )


class Mix:
    """One call of the mix per `n` (its RPC drawn by weight); per-RPC results kept."""

    def __init__(self, channels: list, args: argparse.Namespace) -> None:
        self.clients = [h.RawClip(c) for c in channels]  # several connections, as clients would
        self.metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
        self.deadline_s = args.deadline_s
        self.jpegs = h.photo_pool(HOT, seed=7)
        self.stats = {name: h.LoadResult(name, 0) for name in WORKLOAD}
        self.item_errors: Counter[str] = Counter()

    def text(self, rng: random.Random, n: int) -> str:
        return short_caption(rng.randrange(HOT)) if rng.random() < HOT_SHARE else mixed_caption(n)

    def image(self, rng: random.Random, n: int) -> bytes:
        if rng.random() < HOT_SHARE:
            k = rng.randrange(HOT)
            return h.unique_jpeg(self.jpegs[k], -1 - k)  # always the same bytes for one k
        return h.unique_jpeg(self.jpegs[n % HOT], n)

    async def call(self, n: int) -> int:
        rng = random.Random(n)
        name = rng.choices(list(WORKLOAD), list(WORKLOAD.values()))[0]
        stats, begin = self.stats[name], time.perf_counter()
        stats.calls += 1
        try:
            items = await self._call(name, self.clients[n % len(self.clients)], rng, n)
        except h.FAILED_CALL as exc:
            stats.errors[h.error_code(exc)] += 1
            raise
        stats.items += items
        stats.latencies_s.append(time.perf_counter() - begin)
        return items

    async def _call(self, name: str, client: h.RawClip, rng: random.Random, n: int) -> int:
        if name == "EmbedStream":
            return await self._stream(client, rng, n)
        if name == "EmbedText":
            texts = [self.text(rng, n * 8 + k) for k in range(rng.randint(1, 4))]
            method, count = client.embed_text, len(texts)
            request = pb.EmbedTextRequest(texts=texts, format=PACKED)
        elif name == "EmbedImage":
            images = [self.image(rng, n * 8 + k) for k in range(rng.randint(1, 2))]
            method, count = client.embed_image, len(images)
            request = pb.EmbedImageRequest(images=images, format=PACKED)
        elif name == "Classify":
            method, count = client.classify, 1
            labels = list(rng.choice(LABEL_SETS))
            request = pb.ClassifyRequest(images=[self.image(rng, n * 8)], labels=labels, top_k=3)
        else:  # Similarity: 2 text queries against 3 images
            method, count = client.similarity, 5
            request = pb.SimilarityRequest(
                queries=[pb.Item(text=self.text(rng, n * 8 + k)) for k in range(2)],
                candidates=[pb.Item(image=self.image(rng, n * 8 + 2 + k)) for k in range(3)],
            )
        await method(request.SerializeToString(), timeout=self.deadline_s, metadata=self.metadata)
        return count

    async def _stream(self, client: h.RawClip, rng: random.Random, n: int) -> int:
        async def requests():  # every fourth item an image
            for k in range(STREAM_ITEMS):
                i = n * 32 + k
                item = {"image": self.image(rng, i)} if k % 4 == 3 else {"text": self.text(rng, i)}
                yield pb.StreamRequest(id=str(k), format=PACKED, **item)

        call = client.embed_stream(requests(), timeout=self.deadline_s, metadata=self.metadata)
        answers = [answer async for answer in call]
        errors = [a.error.code for a in answers if a.WhichOneof("result") == "error"]
        self.item_errors.update(errors)
        return len(answers) - len(errors)


async def drive(target: str, args: argparse.Namespace, pid: int | None, triton_pgid: int | None):
    """Run the callers; returns the mix, the whole run's result and memory samples."""
    memory: dict[str, list[float]] = defaultdict(list)

    def sample() -> None:
        if pid is not None:
            with contextlib.suppress(OSError):
                rss, peak = h.memory_mb(pid)
                memory["gateway"].append(rss)
                memory["peak"] = [peak]
        if triton_pgid is not None:
            memory["triton"].append(h.group_total(triton_pgid, lambda p: h.memory_mb(p)[0]))

    channels = [h.channel(target) for _ in range(args.channels)]
    mix = Mix(channels, args)
    cpu_start = h.cpu_seconds(pid) if pid is not None else float("nan")
    try:
        async with h.every(1.0, sample):
            result = await h.closed_loop(
                mix.call, label="load", concurrency=args.callers, seconds=args.seconds,
                max_calls=args.max_requests, warmup_rounds=0, max_seconds=args.seconds,
            )  # fmt: skip
    finally:
        for c in channels:
            await c.close()
    if pid is not None:
        with contextlib.suppress(OSError):
            memory["cpu"] = [cpu_start, h.cpu_seconds(pid)]
    sample()
    return mix, result, memory


def report(
    args: argparse.Namespace, mix: Mix, result: h.LoadResult, memory: dict, info: list, note: str
) -> str:
    """The Markdown report."""
    elapsed = result.seconds

    def rpc_row(name: str, r: h.LoadResult, errors: str) -> list[object]:
        p = [h.fmt(r.percentile_ms(q)) for q in (50, 95, 99)]
        calls, ok = len(r.latencies_s) + sum(r.errors.values()), len(r.latencies_s)
        return [name, calls, h.fmt(ok / elapsed), h.fmt(r.items / elapsed), *p, errors]

    stream = "; stream items: " + h.codes_text(mix.item_errors) if mix.item_errors else ""
    rows = [
        rpc_row(n, s, s.error_text + stream * (n == "EmbedStream")) for n, s in mix.stats.items()
    ]
    rows.append(rpc_row("**all**", result, result.error_text))
    peak = {"gateway": h.fmt(memory.get("peak", [float("nan")])[0]), "triton": "–"}
    mem_rows = [
        [name, h.fmt(m[0]), h.fmt(m[-1]), h.fmt(max(m)), peak[key]]
        for key, name in (("gateway", "gateway"), ("triton", "tritonserver + stubs"))
        if (m := memory.get(key))
    ]
    parts = [
        *h.report_head("Load run", info),
        f"{note} {args.callers} callers over {args.channels} connections for "
        f"{elapsed:.1f} s (asked {args.seconds:g} s), call deadline {args.deadline_s:g} s. Mix: "
        + ", ".join(f"{n} {w} %" for n, w in WORKLOAD.items())
        + " (what each call holds: bench/README.md). `items/s` counts texts and images sent.",
        "",
        h.md_table(RPC_HEADERS, rows),
        "",
    ]
    if mem_rows:
        headers = ["process", "start", "end", "max sampled", "peak (VmHWM)"]
        table = h.md_table(headers, mem_rows)
        parts += ["Resident memory (MB), sampled every second:", "", table, ""]
    if cpu := memory.get("cpu"):
        used = cpu[1] - cpu[0]
        parts += [f"Gateway CPU: {used:.1f} s in {elapsed:.1f} s of wall time "
                  f"({used / elapsed:.2f} cores on average).", ""]  # fmt: skip
    return "\n".join(parts)


async def run(args: argparse.Namespace) -> int:
    h.section("load")
    info = h.machine_info()
    if args.target:
        check_loopback(args.target)
        wait_serving(args.target, 30.0)
        note = f"Target {args.target} (started elsewhere{f', pid {args.pid}' if args.pid else ''})."
        mix, result, memory = await drive(args.target, args, args.pid, None)
    else:
        mix, result, memory, note = await self_started(args, info)
    text = report(args, mix, result, memory, info, note)
    h.write_result(args.out, text, text.split("\n\n", 2)[2])
    return 0


async def self_started(args: argparse.Namespace, info: list) -> tuple:
    """Start redis-server / tritonserver if asked, and a gateway; run the load against it."""
    repository = h.model_repository(args.model)
    info.append(h.machine_info(args.torch_threads)[-1])
    with contextlib.ExitStack() as stack:
        settings: dict[str, object] = {"torch_threads": args.torch_threads}
        note = f"Self-started gateway ({args.model}, embedded LRU cache"
        if args.redis:
            settings["redis_url"] = stack.enter_context(h.redis()).url
            note += " + real redis-server"
        triton_pgid = None
        if args.triton:
            triton = stack.enter_context(h.triton(repository, torch_threads=args.torch_threads))
            settings.update(backend="triton", triton_url=triton.grpc_url)
            triton_pgid, note = triton.pid, note + ", backend: real tritonserver"
        else:
            note += ", backend: embedded"
        if args.api_key:
            keys = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-keys-"))
            keyfile = Path(keys) / "keys"
            keyfile.write_text(args.api_key + "\n")
            settings["api_keys_file"], note = keyfile, note + ", API keys on"
        gateway = stack.enter_context(h.gateway(repository, "load", **settings))
        note += f"; pid {gateway.pid})."
        print(f"  gateway {gateway.target} pid {gateway.pid}", flush=True)
        mix, result, memory = await drive(gateway.target, args, gateway.pid, triton_pgid)
        if not gateway.running:
            note += " The gateway process DIED during the run; see its log."
    return mix, result, memory, note


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = h.parser(__doc__, out="load.md")
    p.add_argument("--target", help="HOST:PORT of a running gateway (loopback only)")
    p.add_argument("--callers", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--api-key", help="sent as `authorization: Bearer KEY`")
    p.add_argument("--pid", type=int, help="process id of the --target gateway (for RSS)")
    p.add_argument("--channels", type=int, default=4, help="gRPC connections to spread over")
    p.add_argument("--deadline-s", type=float, default=30.0, help="deadline of each call")
    p.add_argument("--max-requests", type=int, default=0, help="stop after this many calls")
    p.add_argument("--redis", action="store_true", help="self-started: a real redis-server")
    p.add_argument("--triton", action="store_true", help="self-started: a real tritonserver")
    args = p.parse_args(argv)
    bounds = (1 <= args.callers <= 1024, 0 < args.seconds <= 3600, 1 <= args.channels <= 64)
    if not all(bounds):
        p.error("--callers must be 1..1024, --seconds in (0, 3600], --channels 1..64")
    if args.target and (args.redis or args.triton):
        p.error("--redis/--triton start servers for a self-started gateway, not a --target")
    return args


if __name__ == "__main__":
    sys.exit(h.main("bench.load", parse_args(), run))
