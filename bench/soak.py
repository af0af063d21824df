"""Soaks: well-behaved callers against a gateway under hostile callers or under faults.

    python -m bench.soak --mode hostile --seconds 300     # issue 13
    python -m bench.soak --mode faults --seconds 300      # issue 14

What it measures and how: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import random
import string
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from bench import harness as h
from bench.captions import mixed_caption, short_caption
from bench.harness import LoadResult, RawClip, fmt, md_table, section
from service.api.clip.v1 import clip_pb2
from service.processes.metric_samples import sample, scrape

PACKED = clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES
LABELS = (
    "a dog", "a cat", "a horse", "a bird", "a car", "a boat", "a red circle", "a blue star",
)  # fmt: skip
HOT = 32  # distinct photos (and hot captions) the well-behaved callers draw from
DEADLINE_S = 10.0  # every well-behaved call
BACKOFF_S = 0.1  # a well-behaved caller's pause after an error
HEALTH_EVERY_S = 0.5
HEALTH_TARGET_S = 1.0
RSS_EVERY_S = 1.0
RSS_TARGET = 0.10
RECOVERY_TARGET_S = 2.0
CLOSE = 1e-5  # float32 rounding: the same input in batches of other sizes
# Hostile requests, sized against the gateway limits this script sets.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
BIG_SIDE = 7000  # 7000 × 7000 = 49 MP, under the default 50 MP --max-image-pixels
LONG_WORD = 10_000  # letters in one word: --max-text-chars (10,000)
PROMPT_LABELS, PROMPT_TEMPLATES = 1000, 8  # 8,000 prompts, under --max-prompts 8192
STREAM_ITEMS = 2000  # per never-read EmbedStream
STREAM_HOLD_S = 8.0  # how long such a stream stays open unread
RSS_OVER_BASELINE_MB = 300.0  # issue 24: RSS within this of the warm baseline
HTTP_LONG_TEXTS = 64  # cached 10,000-letter texts per HTTP call (usage counted)
WARM_CHUNK = 8  # long texts per gRPC call that puts them in the cache first
SLOW_BODIES = 4  # connections sending one byte of their body, again and again


# ---------------------------------------------------------------------------- samplers
@dataclass
class Monitor:
    """Health-check latency and gateway RSS over time, from a thread of its own.

    A thread with a blocking channel, not a task on the callers' event loop, so that a
    busy loop here does not pass for a slow gateway.
    """

    target: str
    pid: int
    http_port: int = 0
    t0: float = field(default_factory=time.perf_counter)
    health: list[tuple[float, float, str]] = field(default_factory=list)  # (t, s, status)
    http_health: list[tuple[float, float, str]] = field(default_factory=list)  # GET /health
    rss: list[tuple[float, float]] = field(default_factory=list)  # (t, MB)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Monitor:
        self._thread = threading.Thread(target=self._run, name="soak-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _http_check(self) -> float:
        begin = time.perf_counter()
        try:
            url = f"http://127.0.0.1:{self.http_port}/health"
            with urllib.request.urlopen(url, timeout=5.0) as answer:
                status = str(answer.status)
        except OSError as exc:  # HTTPError included: its name is the status then
            status = str(getattr(exc, "code", "")) or type(exc).__name__
        took = time.perf_counter() - begin
        self.http_health.append((begin - self.t0, took, status))
        return took

    def _run(self) -> None:
        next_rss = 0.0
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                begin = time.perf_counter()
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5.0)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                except grpc.RpcError as exc:
                    status = exc.code().name  # type: ignore[attr-defined]
                took = time.perf_counter() - begin
                self.health.append((begin - self.t0, took, status))
                if self.http_port:
                    took += self._http_check()
                if self.now() >= next_rss:
                    next_rss = self.now() + RSS_EVERY_S
                    with contextlib.suppress(OSError):
                        self.rss.append((self.now(), h.memory_mb(self.pid)[0]))
                self._stop.wait(max(0.0, HEALTH_EVERY_S - took))


# ---------------------------------------------------------------------------- callers
class WellBehaved:
    """Ordinary calls in turn: EmbedText (2 captions), EmbedImage (1 photo), Classify.

    Half of the inputs repeat from a hot set of `HOT`, half are new. Answers of
    EmbedText and EmbedImage are parsed when `keep_vectors` is set, and every vector
    is kept by input (a caption; a photo's index, whatever its JPEG comment). With
    `http_port`, every fourth call is the harness's `POST /v1/embeddings` (one caption).
    """

    def __init__(
        self, channel: grpc.aio.Channel, *, keep_vectors: bool, http_port: int = 0
    ) -> None:
        self.raw = RawClip(channel)
        self.http_port = http_port
        self.session: aiohttp.ClientSession | None = None
        self.http_call: Callable[[int], Awaitable[int]] | None = None
        self.jpegs = h.photo_pool(HOT, seed=11)
        self.keep_vectors = keep_vectors
        self.vectors: dict[tuple[str, str], set[bytes]] = defaultdict(set)
        self.errors: list[tuple[float, float, str]] = []  # (start, end, code)
        self.t0 = time.perf_counter()

    def photo(self, n: int) -> tuple[int, bytes]:
        k = n % HOT
        tag = -1 - k if n % 2 else n  # odd: the same bytes every time; even: new bytes
        return k, h.unique_jpeg(self.jpegs[k], tag)

    def caption(self, n: int) -> str:
        return short_caption(n % HOT) if n % 2 else mixed_caption(n)

    async def call(self, n: int) -> int:
        begin = time.perf_counter()
        try:
            if self.http_port and n % 4 == 3:
                return await self._http(n)
            return await self._call(n)
        except h.FAILED_CALL as exc:
            self.errors.append((begin - self.t0, time.perf_counter() - self.t0, h.error_code(exc)))
            await asyncio.sleep(BACKOFF_S)  # a well-behaved caller backs off before retrying
            raise

    async def _http(self, n: int) -> int:
        if self.session is None:
            timeout = aiohttp.ClientTimeout(total=DEADLINE_S)
            self.session = aiohttp.ClientSession(timeout=timeout)
            url = f"http://127.0.0.1:{self.http_port}/v1/embeddings"
            self.http_call = h.http_text_call(self.session, url, self.caption)
        assert self.http_call is not None
        try:
            return await self.http_call(n)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise h.CallFailed(type(exc).__name__) from exc

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _call(self, n: int) -> int:
        kind = n % 3
        if kind == 0:
            texts = [self.caption(n), self.caption(n + 1)]
            answer = await self.raw.embed_text(
                clip_pb2.EmbedTextRequest(texts=texts, format=PACKED).SerializeToString(),
                timeout=DEADLINE_S,
            )
            self._keep(answer, [("text", t) for t in texts])
            return 2
        k, jpeg = self.photo(n)
        if kind == 1:
            answer = await self.raw.embed_image(
                clip_pb2.EmbedImageRequest(images=[jpeg], format=PACKED).SerializeToString(),
                timeout=DEADLINE_S,
            )
            self._keep(answer, [("image", str(k))])
            return 1
        request = clip_pb2.ClassifyRequest(images=[jpeg], labels=LABELS, top_k=3)
        await self.raw.classify(request.SerializeToString(), timeout=DEADLINE_S)
        return 1

    def _keep(self, answer: bytes, keys: Sequence[tuple[str, str]]) -> None:
        if not self.keep_vectors:
            return
        parsed = clip_pb2.EmbedResponse.FromString(answer)
        for key, embedding in zip(keys, parsed.embeddings, strict=True):
            self.vectors[key].add(embedding.packed)


@dataclass
class HostileStats:
    """Outcomes of the hostile callers by kind: gRPC codes (OK included) and latency."""

    codes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def big_jpeg(side: int) -> bytes:
    """A `side`×`side` JPEG (smooth, so small on the wire, but every pixel decoded)."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    pixels = np.empty((side, side, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = ramp[None, :], ramp[:, None], 128
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=75)
    return buffer.getvalue()


def small_jpeg(seed: int) -> bytes:
    """A 32×32 JPEG: many of them in one request stay small on the wire."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


class Hostile:
    """One task per kind of abuse, each calling again as soon as its last call ends."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        stop_at: float,
        gap_s: float,
        http_port: int = 0,
        doors: str = "both",
    ) -> None:
        """`doors`: which hostile kinds run: "both", "grpc" or "http" (to tell them apart)."""
        self.raw = RawClip(channel)
        self.http_port, self.doors = http_port, doors
        self.session: aiohttp.ClientSession | None = None
        self.long_texts: list[str] = []
        # HTTP bodies, built once: building megabytes per call here would hold this
        # process's GIL and slow the health monitor's thread, passing for a slow gateway.
        self.bodies: dict[str, bytes] = {}
        self.gap_s = gap_s
        self.stop_at = stop_at
        self.stats = HostileStats()
        self.rng = random.Random(13)
        self.big = big_jpeg(BIG_SIDE)
        self.smalls = [small_jpeg(i) for i in range(64)]

    def word(self) -> str:
        return "".join(self.rng.choices(string.ascii_lowercase, k=LONG_WORD))

    async def _timed(self, kind: str, call: Callable[[], Awaitable[object]]) -> None:
        begin = time.perf_counter()
        try:
            outcome = await call()
        except grpc.aio.AioRpcError as exc:
            self.stats.codes[kind][exc.code().name] += 1
        else:
            # HTTP calls answer their status ("HTTP 400"); gRPC ones raise unless OK.
            self.stats.codes[kind][outcome if isinstance(outcome, str) else "OK"] += 1
        self.stats.seconds[kind].append(time.perf_counter() - begin)

    async def _repeat(
        self, kind: str, make: Callable[[int], Callable[[], Awaitable[object]]]
    ) -> None:
        for n in itertools.count():
            if time.perf_counter() >= self.stop_at:
                return
            await self._timed(kind, make(n))
            await asyncio.sleep(self.gap_s)  # interleaved, not a flood

    def long_words(self, n: int) -> Callable[[], Awaitable[object]]:
        request = clip_pb2.EmbedTextRequest(texts=[self.word() for _ in range(8)])
        return lambda: self.raw.embed_text(request.SerializeToString(), timeout=60)

    def big_image(self, n: int) -> Callable[[], Awaitable[object]]:
        request = clip_pb2.EmbedImageRequest(images=[h.unique_jpeg(self.big, n)])
        return lambda: self.raw.embed_image(request.SerializeToString(), timeout=60)

    def many_prompts(self, n: int) -> Callable[[], Awaitable[object]]:
        # New labels every call (no label-cache hit); every 4th call is past --max-prompts.
        templates = [f"a photo of a {{}}, style {t}" for t in range(PROMPT_TEMPLATES)]
        labels = [f"thing {n} {i}" for i in range(PROMPT_LABELS)]
        if n % 4 == 3:
            templates = [f"{t} {{}}" for t in range(32)]  # 32,000 prompts
        request = clip_pb2.ClassifyRequest(
            images=[self.smalls[n % 64]], labels=labels, templates=templates, top_k=1
        )
        return lambda: self.raw.classify(request.SerializeToString(), timeout=120)

    def huge_answer(self, n: int) -> Callable[[], Awaitable[object]]:
        # 64 images × 1000 labels of ~60 characters, all returned: ~5 MB of answer.
        labels = [f"label {n} {i} " + "x" * 50 for i in range(1000)]
        request = clip_pb2.ClassifyRequest(images=self.smalls, labels=labels, templates=["{}"])
        return lambda: self.raw.classify(request.SerializeToString(), timeout=60)

    def unread_stream(self, n: int) -> Callable[[], Awaitable[object]]:
        async def go() -> None:
            async def requests() -> AsyncIterator[clip_pb2.StreamRequest]:
                for k in range(STREAM_ITEMS):
                    yield clip_pb2.StreamRequest(
                        id=f"{n}-{k}-" + "i" * 240, text=f"stream {n} item {k}", format=PACKED
                    )

            call = self.raw.embed_stream(requests(), timeout=STREAM_HOLD_S + 30)
            try:
                await asyncio.sleep(STREAM_HOLD_S)  # written, never read
            finally:
                call.cancel()
            # Count what happened as OK: the client walked away on purpose.

        return go

    # ------------------------------------------------------------------ over HTTP
    async def _http(self, path: str, body: bytes, method: str = "POST") -> str:
        """Send `body` as it is; the answer's status as "HTTP 400" (or the error's name)."""
        assert self.session is not None
        try:
            async with self.session.request(
                method, f"http://127.0.0.1:{self.http_port}{path}", data=body,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=120.0),
            ) as answer:  # fmt: skip
                await answer.read()
                return f"HTTP {answer.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__

    def _body(self, name: str, make: Callable[[], bytes]) -> bytes:
        if name not in self.bodies:
            self.bodies[name] = make()
        return self.bodies[name]

    def http_long_texts(self, n: int) -> Callable[[], Awaitable[object]]:
        # The same texts every call, in the cache first (over gRPC, a few per call, within
        # the deadline): only their `usage` is left to do.
        self.long_texts = self.long_texts or [self.word() for _ in range(HTTP_LONG_TEXTS)]
        texts = self.long_texts
        body = self._body(
            "long", lambda: json.dumps({"input": texts, "encoding_format": "base64"}).encode()
        )

        async def go() -> str:
            if n == 0:
                for i in range(0, len(texts), WARM_CHUNK):
                    request = clip_pb2.EmbedTextRequest(texts=texts[i : i + WARM_CHUNK])
                    await self.raw.embed_text(request.SerializeToString(), timeout=300)
            return await self._http("/v1/embeddings", body)

        return go

    def http_empty_objects(self, n: int) -> Callable[[], Awaitable[object]]:
        count = (MAX_MESSAGE_BYTES - 16) // 3  # just under --max-message-bytes
        body = self._body("empty", lambda: b'{"input":[' + b",".join([b"{}"] * count) + b"]}")
        return lambda: self._http("/v1/embeddings", body)

    def http_deep(self, n: int) -> Callable[[], Awaitable[object]]:
        depth = (MAX_MESSAGE_BYTES - 64) // 2
        body = self._body(
            "deep", lambda: b'{"input": "x", "user": ' + b"[" * depth + b"]" * depth + b"}"
        )
        return lambda: self._http("/v1/embeddings", body)

    def http_huge_answer(self, n: int) -> Callable[[], Awaitable[object]]:
        def make() -> bytes:
            labels = [f"label {i} " + "x" * 280 for i in range(1000)]
            images = [base64.b64encode(b).decode() for b in self.smalls] * 4  # 256 images
            return json.dumps({"images": images, "labels": labels, "templates": ["{}"]}).encode()

        body = self._body("answer", make)
        return lambda: self._http("/v1/classify", body)

    def http_surrogate(self, n: int) -> Callable[[], Awaitable[object]]:
        body = b'{"input": ["fine", "lone \\ud800 surrogate"]}'
        return lambda: self._http("/v1/embeddings", body)

    def http_unknown(self, n: int) -> Callable[[], Awaitable[object]]:
        # In turn an unknown route and a known route with a method it does not take.
        if n % 2:
            return lambda: self._http("/v1/embeddings", b"", method="DELETE")
        return lambda: self._http("/v1/nothing-here", b"{}")

    def http_slow_body(self, n: int) -> Callable[[], Awaitable[object]]:
        async def go() -> str:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.http_port)
            try:
                writer.write(
                    b"POST /v1/embeddings HTTP/1.1\r\nHost: soak\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
                )
                await writer.drain()
                # Never more: the gateway ends it (408 after --http-body-timeout-s), or
                # the soak does, so that a short run need not wait for that timeout.
                left = max(1.0, self.stop_at - time.perf_counter())
                try:
                    answer = await asyncio.wait_for(reader.read(), left)
                except TimeoutError:
                    return "still held at the end"
                return answer.split(b"\r\n", 1)[0].decode(errors="replace")[9:] or "closed"
            finally:
                writer.close()

        return go

    async def run(self) -> None:
        kinds: dict[str, Callable[[int], Callable[[], Awaitable[object]]]] = {}
        if self.doors != "http":
            kinds |= {
                "8 × 10,000-letter words": self.long_words,
                f"{BIG_SIDE}×{BIG_SIDE} image (49 MP)": self.big_image,
                "Classify 8,000 prompts (¼: 32,000)": self.many_prompts,
                "answer past --max-message-bytes": self.huge_answer,
                "EmbedStream never read (1)": self.unread_stream,
                "EmbedStream never read (2)": self.unread_stream,
            }
        if self.http_port and self.doors != "grpc":
            kinds |= {
                f"HTTP {HTTP_LONG_TEXTS} cached 10,000-letter texts (usage)": self.http_long_texts,
                "HTTP body of ~1.4 M `{}` (4 MB)": self.http_empty_objects,
                "HTTP nesting ~2 M deep (4 MB)": self.http_deep,
                "HTTP Classify answer past --max-message-bytes": self.http_huge_answer,
                "HTTP lone surrogate": self.http_surrogate,
                "HTTP unknown route / method": self.http_unknown,
            }
            for i in range(SLOW_BODIES):
                kinds[f"HTTP slow body, 1 byte sent ({i + 1})"] = self.http_slow_body
        async with aiohttp.ClientSession() as self.session:
            await asyncio.gather(*(self._repeat(kind, make) for kind, make in kinds.items()))


# ---------------------------------------------------------------------------- helpers
def _duration_note(seconds: float) -> str:
    """How the soak's length compares with the 300 s the issues ask for."""
    if seconds >= 300:
        return f"(`--seconds {seconds:g}`; the issues ask 300 s)"
    return f"(the issues ask 300 s; `--seconds {seconds:g}` here, to fit the session)"


def over_time(samples: Sequence[tuple[float, float]], bucket_s: float) -> list[tuple[float, float]]:
    """(bucket start, max value) per `bucket_s` window."""
    out: dict[int, float] = {}
    for t, v in samples:
        b = int(t // bucket_s)
        out[b] = max(out.get(b, v), v)
    return [(b * bucket_s, v) for b, v in sorted(out.items())]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def caller_row(name: str, r: LoadResult) -> list[object]:
    ok = len(r.latencies_s)
    return [
        name, f"{r.seconds:.1f}", ok + sum(r.errors.values()), fmt(r.calls_per_s),
        fmt(r.percentile_ms(50)), fmt(r.percentile_ms(99)), r.error_text,
    ]  # fmt: skip


def targets_and_callers(targets: list[list[str]], runs: dict[str, LoadResult]) -> list[str]:
    """The sections both soaks share: the targets, and the well-behaved callers per run."""
    rows = [caller_row(name, r) for name, r in runs.items()]
    return [
        "## Targets", "", md_table(["figure", "target", "measured", "verdict"], targets), "",
        "## Well-behaved callers", "",
        md_table(["run", "seconds", "calls", "ok calls/s", "p50 ms", "p99 ms", "errors"], rows), "",
    ]  # fmt: skip


# ---------------------------------------------------------------------------- hostile
async def hostile(args: argparse.Namespace, info: list[tuple[str, str]]) -> str:
    repository = args.repository or h.model_repository(h.DEMO_MODEL)
    with h.gateway(
        repository, "soak-hostile", max_message_bytes=MAX_MESSAGE_BYTES,
        torch_threads=args.torch_threads,
    ) as gateway:  # fmt: skip
        print(f"  gateway {gateway.target} pid {gateway.pid}", flush=True)
        assert gateway.pid is not None
        monitor = Monitor(gateway.target, gateway.pid, gateway.http_port).start()
        channel = h.channel(gateway.target)
        hostile_channel = h.channel(gateway.target)
        good = WellBehaved(channel, keep_vectors=False, http_port=gateway.http_port)
        counter = itertools.count()
        try:
            section(
                f"baseline: {args.callers} well-behaved callers alone, {args.baseline_seconds:g} s"
            )
            t_base = monitor.now()
            base = await h.closed_loop(
                good.call, label="baseline", concurrency=args.callers,
                seconds=args.baseline_seconds, counter=counter,
                max_seconds=args.baseline_seconds + 120,
            )  # fmt: skip
            print(f"  baseline: {caller_row('', base)[2:]}", flush=True)
            section(f"soak: the same callers + hostile traffic, {args.seconds:g} s")
            good.errors.clear()
            t_soak = monitor.now()
            started = time.perf_counter()
            bad = Hostile(
                hostile_channel, started + args.seconds, args.hostile_gap_s,
                gateway.http_port, args.hostile_doors,
            )  # fmt: skip
            hostile_task = asyncio.create_task(bad.run())
            progress = asyncio.create_task(report_progress(monitor, bad.stats, t_soak))
            soak = await h.closed_loop(
                good.call, label="soak", concurrency=args.callers, seconds=args.seconds,
                counter=counter, warmup_rounds=0, max_seconds=args.seconds + 120,
            )  # fmt: skip
            await asyncio.wait_for(hostile_task, 400)
            progress.cancel()
            t_end = monitor.now()
            metrics = scrape(gateway.metrics_port)
        finally:
            monitor.stop()
            await good.close()
            await channel.close()
            await hostile_channel.close()
        alive = gateway.running
    return hostile_report(
        args, info, base, soak, bad.stats, monitor, (t_base, t_soak, t_end), metrics, alive
    )


async def report_progress(monitor: Monitor, stats: HostileStats, t_soak: float) -> None:
    while True:
        await asyncio.sleep(5.0)
        health = [s for t, s, _ in monitor.health if t >= t_soak]
        rss = monitor.rss[-1][1] if monitor.rss else float("nan")
        calls = sum(sum(c.values()) for c in stats.codes.values())
        print(
            f"  t={monitor.now() - t_soak:5.0f}s  hostile calls {calls}  health max "
            f"{max(health, default=0) * 1000:.0f} ms  gateway RSS {rss:.0f} MB",
            flush=True,
        )


def hostile_report(
    args: argparse.Namespace,
    info: list[tuple[str, str]],
    base: LoadResult,
    soak: LoadResult,
    stats: HostileStats,
    monitor: Monitor,
    marks: tuple[float, float, float],
    metrics: dict[str, float],
    alive: bool,
) -> str:
    t_base, t_soak, t_end = marks
    soak_health = [(t, s, st) for t, s, st in monitor.health if t_soak <= t <= t_end]
    base_health = [(t, s, st) for t, s, st in monitor.health if t_base <= t < t_soak]
    worst = max((s for _, s, _ in soak_health), default=float("nan"))
    not_serving = sum(1 for _, _, st in soak_health if st != "SERVING")
    http_soak = [(t, s, st) for t, s, st in monitor.http_health if t_soak <= t <= t_end]
    http_worst = max((s for _, s, _ in http_soak), default=float("nan"))
    http_bad = sum(1 for _, _, st in http_soak if st != "200")
    # The warm baseline: the gateway's RSS over the last quarter of the baseline run (a
    # short baseline may hold no sample there: then its last one).
    before = [v for t, v in monitor.rss if t_base <= t < t_soak]
    base_rss = [v for t, v in monitor.rss if t_base + 0.75 * (t_soak - t_base) <= t < t_soak]
    base_rss = base_rss or before[-1:]
    warm_rss = float(np.median(base_rss)) if base_rss else float("nan")
    soak_rss = max((v for t, v in monitor.rss if t_soak <= t <= t_end), default=float("nan"))
    warm_end = t_soak + args.warmup_seconds
    after = [(t, v) for t, v in monitor.rss if warm_end <= t <= t_end]
    # Big decodes come and go, so single samples jump: compare the largest RSS of the
    # first quarter after warm-up with the largest of the last quarter.
    quarter = (t_end - warm_end) / 4
    first = max((v for t, v in after if t < warm_end + quarter), default=float("nan"))
    last = max((v for t, v in after if t >= t_end - quarter), default=float("nan"))
    growth = (last - first) / first
    slope = float("nan")
    if len(after) > 2:
        ts, vs = np.array([t for t, _ in after]), np.array([v for _, v in after])
        slope = float(np.polyfit(ts, vs, 1)[0]) * 60.0
    errors = sum(soak.errors.values())
    p99_ratio = soak.percentile_ms(99) / base.percentile_ms(99)
    targets = [
        ["well-behaved errors during the soak", "0", str(errors), verdict(errors == 0)],
        ["well-behaved p99, soak ÷ baseline", "–", f"{p99_ratio:.2f}×", "info"],
        [
            "health-check latency, worst during the soak", "< 1 s",
            f"{worst * 1000:,.0f} ms ({len(soak_health)} checks, {not_serving} not SERVING)",
            verdict(worst < HEALTH_TARGET_S and not_serving == 0),
        ],
        [
            "HTTP `GET /health` latency, worst during the soak", "< 1 s",
            f"{http_worst * 1000:,.0f} ms ({len(http_soak)} checks, {http_bad} not 200)",
            verdict(http_worst < HEALTH_TARGET_S and http_bad == 0 and bool(http_soak)),
        ],
        [
            "gateway RSS during the soak over the warm baseline", f"≤ {RSS_OVER_BASELINE_MB:g} MB",
            f"largest {soak_rss:,.0f} MB − warm baseline {warm_rss:,.0f} MB = "
            f"{soak_rss - warm_rss:+,.0f} MB",
            verdict(soak_rss - warm_rss <= RSS_OVER_BASELINE_MB),
        ],
        [
            f"gateway RSS after the first {args.warmup_seconds:g} s of the soak",
            "flat within 10 %",
            f"max of first quarter {first:,.0f} MB → of last quarter {last:,.0f} MB "
            f"({growth:+.1%}); largest {max((v for _, v in after), default=float('nan')):,.0f}"
            f" MB; fitted trend {slope:+.1f} MB/min",
            verdict(abs(growth) <= RSS_TARGET),
        ],
    ]  # fmt: skip
    hostile_rows = []
    for kind, codes in stats.codes.items():
        secs = stats.seconds[kind]
        hostile_rows.append(
            [
                kind, sum(codes.values()),
                ", ".join(f"{c}×{n}" for c, n in sorted(codes.items())),
                fmt(float(np.median(secs)) * 1000), fmt(max(secs) * 1000),
            ]
        )  # fmt: skip
    bucket = max(5.0, round((t_end - t_base) / 30))
    health_rows = [
        [f"{t - t_soak:+.0f}", f"{v * 1000:,.0f}"] for t, v in over_time(
            [(t, s) for t, s, _ in monitor.health if t_base <= t <= t_end], bucket
        )
    ]  # fmt: skip
    rss_rows = [
        [f"{t - t_soak:+.0f}", f"{v:,.0f}"]
        for t, v in over_time([(t, v) for t, v in monitor.rss if t_base <= t <= t_end], bucket)
    ]
    rows = [[h, r] for h, r in zip(health_rows, rss_rows, strict=False)]
    timeline = md_table(
        [f"t (s, 0 = soak start; {bucket:g} s windows)", "health max ms", "gateway RSS max MB"],
        [[h[0], h[1], r[1]] for h, r in rows],
    )
    rejected = sample(metrics, "clip_rejected_items_total")
    parts = [
        *h.report_head("Soak: well-behaved callers among hostile ones (issues 13 and 24)", info),
        f"**Duration used: baseline {base.seconds:.0f} s, soak {soak.seconds:.0f} s** "
        f"{_duration_note(args.seconds)}; callers, gateway and hostile traffic share this "
        f"machine's cores. {args.callers} well-behaved callers; `--max-message-bytes "
        f"{MAX_MESSAGE_BYTES}`, other limits default; `--hostile-doors {args.hostile_doors}`. "
        "The callers, the gateway's settings and every hostile kind: bench/README.md (soak).",
        "",
        *targets_and_callers(
            targets, {"baseline (alone)": base, "soak (with hostile traffic)": soak}
        ),
        f"## Hostile callers (each kind: one task, calling again {args.hostile_gap_s:g} s after "
        "its last call ended)",
        "",
        md_table(["kind", "calls", "outcomes", "median ms", "max ms"], hostile_rows),
        "",
        f"Gateway counter `clip_rejected_items_total` at the end: {rejected:.0f}.",
        "",
        "## Over time",
        "",
        "Worst grpc.health.v1 check and largest gateway VmRSS per window; negative times are "
        "the baseline.",
        "",
        timeline,
        "",
        f"Baseline health checks: {len(base_health)}, worst "
        f"{max((s for _, s, _ in base_health), default=float('nan')) * 1000:,.0f} ms.",
    ]
    if not alive:
        parts += ["", "**The gateway process died during the run; see its log.**"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- faults
@dataclass
class Fault:
    """One kill and restart: when it went down and when it was ready again."""

    what: str
    down_at: float
    up_at: float = float("nan")


async def faults(args: argparse.Namespace, info: list[tuple[str, str]]) -> str:
    repository = args.repository or h.model_repository(h.DEMO_MODEL)
    with contextlib.ExitStack() as stack:
        print("  starting redis-server and tritonserver ...", flush=True)
        redis = stack.enter_context(h.redis())
        triton = stack.enter_context(h.triton(repository))
        gateway = stack.enter_context(
            h.gateway(
                repository, "soak-faults", backend="triton", triton_url=triton.grpc_url,
                redis_url=redis.url, local_cache_items=0, torch_threads=args.torch_threads,
            )
        )  # fmt: skip
        print(f"  gateway {gateway.target} pid {gateway.pid}", flush=True)
        channel = h.channel(gateway.target)
        good = WellBehaved(channel, keep_vectors=True)
        events: list[Fault] = []
        try:
            section(f"soak: {args.callers} callers, Redis then Triton killed, {args.seconds:g} s")
            good.t0 = started = time.perf_counter()
            driver = asyncio.create_task(inject(args, redis, triton, events, started))
            ticker = asyncio.create_task(fault_progress(good, started))
            result = await h.closed_loop(
                good.call, label="faults", concurrency=args.callers, seconds=args.seconds,
                warmup_rounds=1, max_seconds=args.seconds + 120,
            )  # fmt: skip
            await asyncio.wait_for(driver, 600)
            ticker.cancel()
        finally:
            await channel.close()
        alive = gateway.running
        section("clean run: a gateway without cache on the same Triton")
        with h.gateway(
            repository, "soak-clean", backend="triton", triton_url=triton.grpc_url,
            local_cache_items=0,
        ) as clean:  # fmt: skip
            reference, self_check = await clean_vectors(clean.target, good)
    return faults_report(args, info, result, good, events, reference, self_check, alive)


async def inject(
    args: argparse.Namespace, redis: object, triton: object, events: list[Fault], t0: float
) -> None:
    """Kill and restart Redis `--redis-kills` times, then Triton `--triton-kills` times."""
    span = args.seconds
    now = lambda: time.perf_counter() - t0  # noqa: E731

    async def at(t: float) -> None:
        await asyncio.sleep(max(0.0, t - now()))

    async def down_and_up(what: str, server: object) -> Fault:
        """Kill `server` (SIGKILL, its whole group), leave it down, start it on its ports."""
        event = Fault(what, now())
        events.append(event)
        await asyncio.to_thread(server.kill)  # type: ignore[attr-defined]
        print(f"  t={now():5.1f}s  {what} killed", flush=True)
        await asyncio.sleep(args.down_seconds)
        await asyncio.to_thread(server.start)  # type: ignore[attr-defined]
        event.up_at = now()
        print(f"  t={now():5.1f}s  {what} ready", flush=True)
        return event

    # Redis in the first 35 % of the run, Triton after; each down for `--down-seconds`.
    for i in range(args.redis_kills):
        await at(span * (0.08 + 0.27 * i / max(1, args.redis_kills)))
        await down_and_up("redis", redis)
    restart_s = 15.0  # a guess until the first restart is measured
    for i in range(args.triton_kills):
        planned = span * (0.4 + 0.5 * i / max(1, args.triton_kills))
        if events and events[-1].what == "triton":
            planned = max(planned, events[-1].up_at + 5.0)
        if planned + args.down_seconds + restart_s + 5.0 > span:
            print(f"  t={now():5.1f}s  no time left for Triton kill {i + 1}", flush=True)
            break
        await at(planned)
        event = await down_and_up("triton", triton)
        restart_s = event.up_at - event.down_at - args.down_seconds


async def fault_progress(good: WellBehaved, t0: float) -> None:
    while True:
        await asyncio.sleep(5.0)
        answers = sum(len(v) for v in good.vectors.values())
        print(
            f"  t={time.perf_counter() - t0:5.0f}s  distinct (input, vector) pairs {answers}  "
            f"errors {len(good.errors)}",
            flush=True,
        )


async def embed(raw: RawClip, kind: str, inputs: Sequence[str | bytes]) -> list[bytes]:
    """Packed vectors of `inputs` (texts or JPEGs) from one call."""
    if kind == "text":
        request = clip_pb2.EmbedTextRequest(texts=inputs, format=PACKED)
        answer = await raw.embed_text(request.SerializeToString(), timeout=60)
    else:
        request = clip_pb2.EmbedImageRequest(images=inputs, format=PACKED)
        answer = await raw.embed_image(request.SerializeToString(), timeout=60)
    return [e.packed for e in clip_pb2.EmbedResponse.FromString(answer).embeddings]


async def clean_vectors(
    target: str, good: WellBehaved
) -> tuple[dict[tuple[str, str], bytes], tuple[int, int, float]]:
    """Every input seen, embedded once more by a gateway with no cache.

    Also the clean gateway against itself: its first 32 texts sent one per call, against
    the same texts in one call of 64 (equal bit for bit, of, largest difference).
    """
    reference: dict[tuple[str, str], bytes] = {}
    equal, worst, first = 0, 0.0, []
    async with h.channel(target) as channel:
        raw = RawClip(channel)
        texts = sorted(t for kind, t in good.vectors if kind == "text")
        for i in range(0, len(texts), 64):
            chunk = texts[i : i + 64]
            first = first or chunk[:32]
            reference |= {
                ("text", t): v for t, v in zip(chunk, await embed(raw, "text", chunk), strict=True)
            }
        for text in first:
            alone, together = (await embed(raw, "text", [text]))[0], reference[("text", text)]
            equal += alone == together
            diff = np.abs(np.frombuffer(alone, "<f4") - np.frombuffer(together, "<f4"))
            worst = max(worst, float(diff.max()))
        for k, jpeg in enumerate(good.jpegs):
            reference[("image", str(k))] = (await embed(raw, "image", [jpeg]))[0]
    return reference, (equal, len(first), worst)


def faults_report(
    args: argparse.Namespace,
    info: list[tuple[str, str]],
    result: LoadResult,
    good: WellBehaved,
    events: list[Fault],
    reference: dict[tuple[str, str], bytes],
    self_check: tuple[int, int, float],
    alive: bool,
) -> str:
    tritons = [e for e in events if e.what == "triton"]
    # An error belongs to a Triton outage when it ended between the kill and the moment
    # Triton was ready again; one ending up to 2 s later is recovery; any other is a miss.
    during, recovery, outside = [], [], []
    recovery_s = {id(e): 0.0 for e in tritons}
    for start, end, code in good.errors:
        home = next((e for e in tritons if e.down_at <= end <= e.up_at), None)
        if home is not None:
            during.append(code)
            continue
        # Recovery belongs to the latest restart before the error, within 30 s of it.
        back = max(
            (e for e in tritons if e.up_at < end <= e.up_at + 30.0),
            key=lambda e: e.up_at,
            default=None,
        )
        if back is not None:
            recovery_s[id(back)] = max(recovery_s[id(back)], end - back.up_at)
            if end - back.up_at <= RECOVERY_TARGET_S:
                recovery.append(code)
                continue
        outside.append((start, end, code))
    worst_recovery = max(recovery_s.values(), default=float("nan"))
    # Vectors: each input's every answer against the clean gateway's.
    compared = equal = close = 0
    worst_diff = 0.0
    inconsistent = 0
    for key, seen in good.vectors.items():
        if len(seen) > 1:
            inconsistent += 1
        ref = reference.get(key)
        if ref is None:
            continue
        want = np.frombuffer(ref, "<f4")
        for packed in seen:
            compared += 1
            if packed == ref:
                equal += 1
            else:
                got = np.frombuffer(packed, "<f4")
                diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else 1.0
                worst_diff = max(worst_diff, diff)
                close += diff <= CLOSE
    outage_s = sum(e.up_at - e.down_at for e in tritons)
    targets = [
        [
            "well-behaved errors outside Triton's outage (and its 2 s)", "0",
            f"{len(outside)} ({h.codes_text([c for *_, c in outside])})",
            verdict(not outside),
        ],
        [
            "errors after Triton was ready again, longest", "≤ 2 s",
            f"{worst_recovery:.2f} s (over {len(tritons)} restarts)",
            verdict(worst_recovery <= RECOVERY_TARGET_S),
        ],
        [
            "distinct vectors equal to the clean run's, bit for bit", "all",
            f"{equal} of {compared}" + (f" (max abs diff {worst_diff:.1e})" * (compared != equal)),
            verdict(compared == equal and compared > 0),
        ],
        [
            f"the rest within {CLOSE:g} of it (largest abs difference per element)", "–",
            f"{close} of {compared - equal}", "info",
        ],
        [
            "well-behaved p99 over the whole run (outages included)", "–",
            f"{fmt(result.percentile_ms(99))} ms", "info",
        ],
    ]  # fmt: skip
    event_rows = [
        [e.what, f"{e.down_at:.1f}", f"{e.up_at:.1f}", f"{e.up_at - e.down_at:.1f}",
         f"{recovery_s.get(id(e), 0.0):.2f}" if e.what == "triton" else "–"]
        for e in events
    ]  # fmt: skip
    outside_rows = [[f"{s:.1f}", f"{e:.1f}", c] for s, e, c in outside[:20]]
    parts = [
        *h.report_head(
            "Soak: well-behaved callers while Redis and Triton are killed (issue 14)", info
        ),
        f"**Duration used: {result.seconds:.0f} s** {_duration_note(args.seconds)}; "
        "tritonserver, redis-server, the gateway and the callers share this machine's cores. "
        f"{args.callers} well-behaved callers; Redis SIGKILLed {args.redis_kills}×, Triton "
        f"{len(tritons)}×, each down {args.down_seconds:g} s. The setup, the targets and the "
        "clean run: bench/README.md (soak).",
        "",
        *targets_and_callers(targets, {"with faults": result}),
        f"Errors during Triton's outages ({outage_s:.1f} s in all): {len(during)} "
        f"({', '.join(f'{c}×{n}' for c, n in Counter(during).items()) or 'none'}); within 2 s "
        f"after: {len(recovery)}. Inputs answered with more than one distinct vector: "
        f"{inconsistent} of {len(good.vectors)}.",
        "",
        "Float32 results of one input differ in the last bits across batch sizes; the clean "
        f"gateway against itself, with nothing killed: {self_check[1]} texts one per call "
        f"against the same in one call of 64: {self_check[0]} of {self_check[1]} equal bit for "
        f"bit, largest difference {self_check[2]:.1e}.",
        "",
        "## Faults (seconds from the start of the soak)",
        "",
        md_table(
            ["what", "killed at", "ready at", "outage s", "errors after ready, s"], event_rows
        ),
    ]
    if outside_rows:
        parts += ["", "Errors outside the outages (first 20):", "",
                  md_table(["call start s", "call end s", "code"], outside_rows)]  # fmt: skip
    if not alive:
        parts += ["", "**The gateway process died during the run; see its log.**"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = h.parser(__doc__, model=None)
    p.add_argument("--mode", choices=("hostile", "faults"), required=True)
    p.add_argument("--seconds", type=float, default=300.0, help="the soak (issue: 300)")
    p.add_argument(
        "--baseline-seconds", type=float, default=0.0,
        help="hostile: the well-behaved callers alone first (default: a third of --seconds)",
    )  # fmt: skip
    p.add_argument(
        "--warmup-seconds", type=float, default=0.0,
        help="hostile: RSS is judged after this much of the soak (default: a fifth of it)",
    )  # fmt: skip
    p.add_argument("--callers", type=int, default=4)
    p.add_argument("--hostile-gap-s", type=float, default=0.5, help="hostile: pause between calls")
    p.add_argument(
        "--hostile-doors", choices=("both", "grpc", "http"), default="both",
        help="hostile: the hostile kinds of both doors, or of one (to tell their costs apart)",
    )  # fmt: skip
    p.add_argument("--redis-kills", type=int, default=3)
    p.add_argument("--triton-kills", type=int, default=3)
    p.add_argument("--down-seconds", type=float, default=2.0, help="faults: time left dead")
    p.add_argument("--repository", type=Path, help="demo repository (default: exported)")
    p.add_argument("--out", type=Path, help="default bench/results/soak-<mode>.md")
    args = p.parse_args(argv)
    if not 0 < args.seconds <= 3600 or not 1 <= args.callers <= 64:
        p.error("--seconds must be in (0, 3600] and --callers 1..64")
    args.baseline_seconds = args.baseline_seconds or args.seconds / 3
    args.warmup_seconds = args.warmup_seconds or args.seconds / 5
    args.out = args.out or h.RESULTS_DIR / f"soak-{args.mode}.md"
    return args


async def run(args: argparse.Namespace) -> int:
    section(f"soak: {args.mode}")
    info = h.machine_info(args.torch_threads)
    text = await (hostile(args, info) if args.mode == "hostile" else faults(args, info))
    h.write_result(args.out, text, text.split("## Targets", 1)[1].split("\n## ", 1)[0].strip())
    return 0


if __name__ == "__main__":
    sys.exit(h.main("bench.soak", parse_args(), run))
