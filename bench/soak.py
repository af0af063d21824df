"""Soaks: well-behaved callers against a gateway under hostile callers or under faults.

    python -m bench.soak --mode hostile --seconds 300     # issues 13 and 24
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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from bench import harness as h
from bench.captions import mixed_caption, short_caption
from bench.harness import LoadResult, RawClip, fmt, md_table, section, verdict
from service.api.clip.v1 import clip_pb2 as pb
from service.processes.metric_samples import sample, scrape

PACKED = pb.VECTOR_FORMAT_FLOAT32_BYTES
LABELS = ("a dog", "a cat", "a horse", "a bird", "a car", "a boat", "a red circle", "a blue star")
HOT = 32  # distinct photos (and hot captions) the well-behaved callers draw from
DEADLINE_S, BACKOFF_S = 10.0, 0.1  # every well-behaved call; its pause after an error
HEALTH_EVERY_S, HEALTH_TARGET_S, RSS_EVERY_S, RSS_TARGET = 0.5, 1.0, 1.0, 0.10
RECOVERY_TARGET_S = 2.0
CLOSE = 1e-5  # float32 rounding: the same input in batches of other sizes
RSS_OVER_BASELINE_MB = 300.0  # issue 24: RSS within this of the warm baseline
# Hostile requests, sized against the gateway limits this script sets.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
BIG_SIDE = 7000  # 7000 × 7000 = 49 MP, under the default 50 MP --max-image-pixels
LONG_WORD = 10_000  # letters in one word: --max-text-chars (10,000)
PROMPT_LABELS, PROMPT_TEMPLATES = 1000, 8  # 8,000 prompts, under --max-prompts 8192
STREAM_ITEMS, STREAM_HOLD_S = 2000, 8.0  # per never-read EmbedStream, held open unread
HTTP_LONG_TEXTS, WARM_CHUNK = 64, 8  # cached long texts per HTTP call; per gRPC warming call
SLOW_BODIES = 4  # connections sending one byte of their body, again and again
Kind = Callable[[int], Awaitable[object]]


class Monitor:
    """Health-check latency and gateway RSS over time, from a thread of its own (a blocking
    channel, so that a busy event loop here does not pass for a slow gateway)."""

    def __init__(self, target: str, pid: int, http_port: int) -> None:
        self.t0 = time.perf_counter()
        self.health: list[tuple[float, float, str]] = []  # (t, seconds, status)
        self.http_health: list[tuple[float, float, str]] = []  # GET /health
        self.rss: list[tuple[float, float]] = []  # (t, MB)
        self._stop = threading.Event()
        url = f"http://127.0.0.1:{http_port}/health"
        self._thread = threading.Thread(target=self._run, args=(target, pid, url), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _timed(self, check: Callable[[], object], into: list) -> float:
        begin = time.perf_counter()
        try:
            status = str(check())
        except grpc.RpcError as exc:
            status = exc.code().name  # type: ignore[attr-defined]
        except OSError as exc:  # HTTPError included: its name is the status then
            status = str(getattr(exc, "code", "")) or type(exc).__name__
        into.append((begin - self.t0, took := time.perf_counter() - begin, status))
        return took

    def _run(self, target: str, pid: int, url: str) -> None:
        def http_health() -> int:
            with urllib.request.urlopen(url, timeout=5.0) as answer:
                return answer.status

        next_rss, request = 0.0, health_pb2.HealthCheckRequest(service="")
        name = health_pb2.HealthCheckResponse.ServingStatus.Name
        with grpc.insecure_channel(target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while not self._stop.is_set():
                took = self._timed(lambda: name(check(request, timeout=5.0).status), self.health)
                took += self._timed(http_health, self.http_health)
                if self.now() >= next_rss:
                    next_rss = self.now() + RSS_EVERY_S
                    with contextlib.suppress(OSError):
                        self.rss.append((self.now(), h.memory_mb(pid)[0]))
                self._stop.wait(max(0.0, HEALTH_EVERY_S - took))


class WellBehaved:
    """Ordinary calls in turn: EmbedText (2 captions), EmbedImage (1 photo), Classify; half
    the inputs from a hot set of `HOT`. With `keep_vectors`, every answered vector is kept
    by input; with `http_port`, every fourth call is `POST /v1/embeddings` (one caption)."""

    def __init__(self, channel: grpc.aio.Channel, *, keep_vectors: bool, http_port: int = 0):
        self.raw, self.keep_vectors = RawClip(channel), keep_vectors
        self.jpegs = h.photo_pool(HOT, seed=11)
        self.vectors: dict[tuple[str, str], set[bytes]] = defaultdict(set)
        self.errors: list[tuple[float, float, str]] = []  # (start, end, code)
        self.t0 = time.perf_counter()
        self.session, self.http = None, None
        if http_port:
            timeout = aiohttp.ClientTimeout(total=DEADLINE_S)
            self.session = aiohttp.ClientSession(timeout=timeout)
            url = f"http://127.0.0.1:{http_port}/v1/embeddings"
            self.http = h.http_text_call(self.session, url, self.caption)

    def caption(self, n: int) -> str:
        return short_caption(n % HOT) if n % 2 else mixed_caption(n)

    async def call(self, n: int) -> int:
        begin = time.perf_counter()
        try:
            return await (self._http(n) if self.http and n % 4 == 3 else self._call(n))
        except h.FAILED_CALL as exc:
            self.errors.append((begin - self.t0, time.perf_counter() - self.t0, h.error_code(exc)))
            await asyncio.sleep(BACKOFF_S)  # a well-behaved caller backs off before retrying
            raise

    async def _http(self, n: int) -> int:
        try:
            return await self.http(n)  # type: ignore[misc]
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise h.CallFailed(type(exc).__name__) from exc

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _call(self, n: int) -> int:
        k = n % HOT
        jpeg = h.unique_jpeg(self.jpegs[k], -1 - k if n % 2 else n)  # odd: the same bytes
        if n % 3 == 2:
            request = pb.ClassifyRequest(images=[jpeg], labels=LABELS, top_k=3)
            await self.raw.classify(request.SerializeToString(), timeout=DEADLINE_S)
            return 1
        texts = [self.caption(n), self.caption(n + 1)]
        kind, keys = ("text", texts) if n % 3 == 0 else ("image", [str(k)])
        vectors = await embed(self.raw, kind, keys if kind == "text" else [jpeg], DEADLINE_S)
        for key, vector in zip(keys, vectors, strict=True) if self.keep_vectors else ():
            self.vectors[(kind, key)].add(vector)
        return len(keys)


async def embed(raw: RawClip, kind: str, inputs: Sequence, deadline_s: float = 60) -> list[bytes]:
    """Packed float32 vectors of `inputs` (texts or JPEGs) from one call."""
    if kind == "text":
        call, request = raw.embed_text, pb.EmbedTextRequest(texts=inputs, format=PACKED)
    else:
        call, request = raw.embed_image, pb.EmbedImageRequest(images=inputs, format=PACKED)
    answer = await call(request.SerializeToString(), timeout=deadline_s)
    return [e.packed for e in pb.EmbedResponse.FromString(answer).embeddings]


def jpeg(pixels: np.ndarray, **options: int) -> bytes:
    """`pixels` (H, W, 3 uint8) as JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def big_jpeg(side: int) -> bytes:
    """A `side`×`side` JPEG (smooth, so small on the wire, but every pixel decoded)."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    pixels = np.empty((side, side, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = ramp[None, :], ramp[:, None], 128
    return jpeg(pixels, quality=75)


class Hostile:
    """One task per kind of abuse (of `doors`: both, grpc or http), each calling again
    `gap_s` after its last call ends, until `stop_at`; outcomes and seconds by kind."""

    def __init__(self, channel, stop_at: float, gap_s: float, http_port: int, doors: str) -> None:
        self.raw, self.http_port, self.doors = RawClip(channel), http_port, doors
        self.gap_s, self.stop_at, self.rng = gap_s, stop_at, random.Random(13)
        self.session: aiohttp.ClientSession | None = None
        self.codes: dict[str, Counter[str]] = defaultdict(Counter)
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.big = big_jpeg(BIG_SIDE)
        rng = np.random.default_rng(0)
        self.smalls = [jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(64)]
        self.long_texts = [self.word() for _ in range(HTTP_LONG_TEXTS)]
        # HTTP bodies, built once: building megabytes per call here would hold this
        # process's GIL and slow the health monitor's thread, passing for a slow gateway.
        labels = [f"label {i} " + "x" * 280 for i in range(1000)]
        images = [base64.b64encode(b).decode() for b in self.smalls] * 4  # 256 images
        depth = (MAX_MESSAGE_BYTES - 64) // 2
        self.bodies = {
            "long": json.dumps({"input": self.long_texts, "encoding_format": "base64"}).encode(),
            "empty": b'{"input":[' + b",".join([b"{}"] * ((MAX_MESSAGE_BYTES - 16) // 3)) + b"]}",
            "deep": b'{"input": "x", "user": ' + b"[" * depth + b"]" * depth + b"}",
            "answer": json.dumps({"images": images, "labels": labels, "templates": ["{}"]})
            .encode(),
        }  # fmt: skip

    def word(self) -> str:
        return "".join(self.rng.choices(string.ascii_lowercase, k=LONG_WORD))

    async def _repeat(self, kind: str, call: Kind) -> None:
        for n in itertools.count():
            if time.perf_counter() >= self.stop_at:
                return
            begin = time.perf_counter()
            try:
                outcome = await call(n)
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name
            # HTTP calls answer their status ("HTTP 400"); gRPC ones raise unless OK.
            self.codes[kind][outcome if isinstance(outcome, str) else "OK"] += 1
            self.seconds[kind].append(time.perf_counter() - begin)
            await asyncio.sleep(self.gap_s)  # interleaved, not a flood

    def _grpc(self, method: str, request, timeout: float = 60) -> Awaitable[object]:
        return getattr(self.raw, method)(request.SerializeToString(), timeout=timeout)

    def long_words(self, n: int) -> Awaitable[object]:
        return self._grpc("embed_text", pb.EmbedTextRequest(texts=[self.word() for _ in range(8)]))

    def big_image(self, n: int) -> Awaitable[object]:
        return self._grpc("embed_image", pb.EmbedImageRequest(images=[h.unique_jpeg(self.big, n)]))

    def many_prompts(self, n: int) -> Awaitable[object]:
        # New labels every call (no label-cache hit); every 4th call is past --max-prompts.
        templates = [f"a photo of a {{}}, style {t}" for t in range(PROMPT_TEMPLATES)]
        if n % 4 == 3:
            templates = [f"{t} {{}}" for t in range(32)]  # 32,000 prompts
        labels = [f"thing {n} {i}" for i in range(PROMPT_LABELS)]
        request = pb.ClassifyRequest(
            images=[self.smalls[n % 64]], labels=labels, templates=templates, top_k=1
        )
        return self._grpc("classify", request, 120)

    def huge_answer(self, n: int) -> Awaitable[object]:
        # 64 images × 1000 labels of ~60 characters, all returned: ~5 MB of answer.
        labels = [f"label {n} {i} " + "x" * 50 for i in range(1000)]
        return self._grpc(
            "classify", pb.ClassifyRequest(images=self.smalls, labels=labels, templates=["{}"])
        )

    async def unread_stream(self, n: int) -> None:  # counted OK: the client walks away
        async def requests():
            for k in range(STREAM_ITEMS):
                yield pb.StreamRequest(
                    id=f"{n}-{k}-" + "i" * 240, text=f"stream {n} item {k}", format=PACKED
                )

        call = self.raw.embed_stream(requests(), timeout=STREAM_HOLD_S + 30)
        try:
            await asyncio.sleep(STREAM_HOLD_S)  # written, never read
        finally:
            call.cancel()

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

    def http_body(self, path: str, body: str | bytes) -> Kind:
        """Every call sends `body` (a name of `self.bodies`, or the bytes themselves)."""
        data = self.bodies[body] if isinstance(body, str) else body
        return lambda n: self._http(path, data)

    async def http_long_texts(self, n: int) -> str:
        # The same texts every call, in the cache first (over gRPC, a few per call, within
        # the deadline): only their `usage` is left to do.
        for i in range(0, len(self.long_texts) if n == 0 else 0, WARM_CHUNK):
            request = pb.EmbedTextRequest(texts=self.long_texts[i : i + WARM_CHUNK])
            await self.raw.embed_text(request.SerializeToString(), timeout=300)
        return await self._http("/v1/embeddings", self.bodies["long"])

    def http_unknown(self, n: int) -> Awaitable[str]:
        # In turn an unknown route and a known route with a method it does not take.
        if n % 2:
            return self._http("/v1/embeddings", b"", method="DELETE")
        return self._http("/v1/nothing-here", b"{}")

    async def http_slow_body(self, n: int) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.http_port)
        try:
            writer.write(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: soak\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
            )
            await writer.drain()
            # Never more: the gateway ends it (408 after --http-body-timeout-s), or the soak
            # does, so that a short run need not wait for that timeout.
            try:
                answer = await asyncio.wait_for(
                    reader.read(), max(1.0, self.stop_at - time.perf_counter())
                )
            except TimeoutError:
                return "still held at the end"
            return answer.split(b"\r\n", 1)[0].decode(errors="replace")[9:] or "closed"
        finally:
            writer.close()

    async def run(self) -> None:
        kinds: dict[str, Kind] = {}
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
            surrogate = b'{"input": ["fine", "lone \\ud800 surrogate"]}'
            kinds |= {
                f"HTTP {HTTP_LONG_TEXTS} cached 10,000-letter texts (usage)": self.http_long_texts,
                "HTTP body of ~1.4 M `{}` (4 MB)": self.http_body("/v1/embeddings", "empty"),
                "HTTP nesting ~2 M deep (4 MB)": self.http_body("/v1/embeddings", "deep"),
                "HTTP Classify answer past --max-message-bytes":
                    self.http_body("/v1/classify", "answer"),
                "HTTP lone surrogate": self.http_body("/v1/embeddings", surrogate),
                "HTTP unknown route / method": self.http_unknown,
            }  # fmt: skip
            for i in range(SLOW_BODIES):
                kinds[f"HTTP slow body, 1 byte sent ({i + 1})"] = self.http_slow_body
        async with aiohttp.ClientSession() as self.session:
            await asyncio.gather(*(self._repeat(kind, call) for kind, call in kinds.items()))


# ---------------------------------------------------------------------------- reports
def over_time(samples: Sequence[tuple[float, float]], bucket_s: float) -> list[tuple[float, float]]:
    """(bucket start, max value) per `bucket_s` window."""
    out: dict[int, float] = {}
    for t, v in samples:
        out[int(t // bucket_s)] = max(out.get(int(t // bucket_s), v), v)
    return [(b * bucket_s, v) for b, v in sorted(out.items())]


def caller_row(name: str, r: LoadResult) -> list[object]:
    calls = len(r.latencies_s) + sum(r.errors.values())
    p50, p99 = fmt(r.percentile_ms(50)), fmt(r.percentile_ms(99))
    return [name, f"{r.seconds:.1f}", calls, fmt(r.calls_per_s), p50, p99, r.error_text]


def report(
    args: argparse.Namespace, info: list, title: str, duration: str, setup: str,
    targets: list[list[str]], runs: dict[str, LoadResult], rest: list[str], alive: bool,
) -> str:  # fmt: skip
    """A soak's report: the head, the targets, the well-behaved callers, then `rest`."""
    rows = [caller_row(name, r) for name, r in runs.items()]
    asked = f"(`--seconds {args.seconds:g}`; the issues ask 300 s)" if args.seconds >= 300 else (
        f"(the issues ask 300 s; `--seconds {args.seconds:g}` here, to fit the session)"
    )  # fmt: skip
    parts = [
        *h.report_head(title, info),
        f"**Duration used: {duration}** {asked}; {setup} The setup and the targets: "
        "bench/README.md (soak).", "",
        "## Targets", "", md_table(["figure", "target", "measured", "verdict"], targets), "",
        "## Well-behaved callers", "",
        md_table(["run", "seconds", "calls", "ok calls/s", "p50 ms", "p99 ms", "errors"], rows),
        "", *rest,
    ]  # fmt: skip
    if not alive:
        parts += ["", "**The gateway process died during the run; see its log.**"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- hostile
async def hostile(args: argparse.Namespace, info: list[tuple[str, str]]) -> str:
    repository = h.model_repository(h.DEMO_MODEL)
    with h.gateway(
        repository, "soak-hostile", max_message_bytes=MAX_MESSAGE_BYTES,
        torch_threads=args.torch_threads,
    ) as gateway:  # fmt: skip
        print(f"  gateway {gateway.target} pid {gateway.pid}", flush=True)
        assert gateway.pid is not None
        monitor = Monitor(gateway.target, gateway.pid, gateway.http_port)
        channel, hostile_channel = h.channel(gateway.target), h.channel(gateway.target)
        good = WellBehaved(channel, keep_vectors=False, http_port=gateway.http_port)
        loop = dict(call=good.call, concurrency=args.callers, counter=itertools.count())

        def progress() -> None:
            health = [s for t, s, _ in monitor.health if t >= t_soak]
            print(
                f"  t={monitor.now() - t_soak:5.0f}s  hostile calls "
                f"{sum(sum(c.values()) for c in bad.codes.values())}  health max "
                f"{max(health, default=0) * 1000:.0f} ms  gateway RSS "
                f"{monitor.rss[-1][1] if monitor.rss else float('nan'):.0f} MB", flush=True,
            )  # fmt: skip

        try:
            section(
                f"baseline: {args.callers} well-behaved callers alone, {args.baseline_seconds:g} s"
            )
            t_base = monitor.now()
            base = await h.closed_loop(
                label="baseline", seconds=args.baseline_seconds,
                max_seconds=args.baseline_seconds + 120, **loop,
            )  # fmt: skip
            print(f"  baseline: {caller_row('', base)[2:]}", flush=True)
            section(f"soak: the same callers + hostile traffic, {args.seconds:g} s")
            t_soak = monitor.now()
            bad = Hostile(
                hostile_channel, time.perf_counter() + args.seconds, args.hostile_gap_s,
                gateway.http_port, args.hostile_doors,
            )  # fmt: skip
            hostile_task = asyncio.create_task(bad.run())
            async with h.every(5.0, progress):
                soak = await h.closed_loop(
                    label="soak", seconds=args.seconds, warmup_rounds=0,
                    max_seconds=args.seconds + 120, **loop,
                )  # fmt: skip
                await asyncio.wait_for(hostile_task, 400)
            t_end = monitor.now()
            metrics = scrape(gateway.metrics_port)
        finally:
            monitor.stop()
            await good.close()
            await channel.close()
            await hostile_channel.close()
        alive = gateway.running
    return hostile_report(
        args, info, base, soak, bad, monitor, (t_base, t_soak, t_end), metrics, alive
    )


def hostile_report(
    args: argparse.Namespace, info: list, base: LoadResult, soak: LoadResult, bad: Hostile,
    monitor: Monitor, marks: tuple[float, float, float], metrics: dict[str, float], alive: bool,
) -> str:  # fmt: skip
    t_base, t_soak, t_end = marks
    nan = float("nan")
    during = lambda samples: [x for x in samples if t_soak <= x[0] <= t_end]  # noqa: E731
    grpc_soak, http_soak = during(monitor.health), during(monitor.http_health)
    worst, http_worst = (max((s for _, s, _ in x), default=nan) for x in (grpc_soak, http_soak))
    not_serving = sum(st != "SERVING" for *_, st in grpc_soak)
    http_bad = sum(st != "200" for *_, st in http_soak)
    # The warm baseline: the gateway's RSS over the last quarter of the baseline run (a
    # short baseline may hold no sample there: then its last one).
    before = [(t, v) for t, v in monitor.rss if t_base <= t < t_soak]
    warm = [v for t, v in before if t >= t_base + 0.75 * (t_soak - t_base)] or [
        v for _, v in before[-1:]
    ]
    warm_rss = float(np.median(warm)) if warm else nan
    soak_rss = max((v for _, v in during(monitor.rss)), default=nan)
    warm_end = t_soak + args.warmup_seconds
    after = [(t, v) for t, v in monitor.rss if warm_end <= t <= t_end]
    # Big decodes come and go, so single samples jump: compare the largest RSS of the
    # first quarter after warm-up with the largest of the last quarter.
    quarter = (t_end - warm_end) / 4
    first = max((v for t, v in after if t < warm_end + quarter), default=nan)
    last = max((v for t, v in after if t >= t_end - quarter), default=nan)
    growth = (last - first) / first
    slope = float(np.polyfit(*zip(*after, strict=True), 1)[0]) * 60.0 if len(after) > 2 else nan
    errors = sum(soak.errors.values())
    targets = [
        ["well-behaved errors during the soak", "0", str(errors), verdict(errors == 0)],
        ["well-behaved p99, soak ÷ baseline", "–",
         f"{soak.percentile_ms(99) / base.percentile_ms(99):.2f}×", "info"],
        ["health-check latency, worst during the soak", "< 1 s",
         f"{worst * 1000:,.0f} ms ({len(grpc_soak)} checks, {not_serving} not SERVING)",
         verdict(worst < HEALTH_TARGET_S and not_serving == 0)],
        ["HTTP `GET /health` latency, worst during the soak", "< 1 s",
         f"{http_worst * 1000:,.0f} ms ({len(http_soak)} checks, {http_bad} not 200)",
         verdict(http_worst < HEALTH_TARGET_S and http_bad == 0 and bool(http_soak))],
        ["gateway RSS during the soak over the warm baseline", f"≤ {RSS_OVER_BASELINE_MB:g} MB",
         f"largest {soak_rss:,.0f} MB − warm baseline {warm_rss:,.0f} MB = "
         f"{soak_rss - warm_rss:+,.0f} MB", verdict(soak_rss - warm_rss <= RSS_OVER_BASELINE_MB)],
        [f"gateway RSS after the first {args.warmup_seconds:g} s of the soak", "flat within 10 %",
         f"max of first quarter {first:,.0f} MB → of last quarter {last:,.0f} MB "
         f"({growth:+.1%}); largest {max((v for _, v in after), default=nan):,.0f}"
         f" MB; fitted trend {slope:+.1f} MB/min", verdict(abs(growth) <= RSS_TARGET)],
    ]  # fmt: skip
    hostile_rows = [
        [kind, sum(codes.values()), h.codes_text(codes), fmt(float(np.median(secs)) * 1000),
         fmt(max(secs) * 1000)]
        for kind, codes in bad.codes.items() if (secs := bad.seconds[kind])
    ]  # fmt: skip
    bucket = max(5.0, round((t_end - t_base) / 30))
    window = lambda samples: over_time([x for x in samples if t_base <= x[0] <= t_end], bucket)  # noqa: E731
    timeline = [
        [f"{t - t_soak:+.0f}", f"{health * 1000:,.0f}", f"{rss:,.0f}"]
        for (t, health), (_, rss) in zip(
            window([(t, s) for t, s, _ in monitor.health]), window(monitor.rss), strict=False
        )
    ]
    base_health = [s for t, s, _ in monitor.health if t_base <= t < t_soak]
    rest = [
        f"## Hostile callers (each kind: one task, calling again {args.hostile_gap_s:g} s after "
        "its last call ended)", "",
        md_table(["kind", "calls", "outcomes", "median ms", "max ms"], hostile_rows), "",
        f"Gateway counter `clip_rejected_items_total` at the end: "
        f"{sample(metrics, 'clip_rejected_items_total'):.0f}.", "",
        "## Over time", "",
        "Worst grpc.health.v1 check and largest gateway VmRSS per window; negative times are "
        "the baseline.", "",
        md_table([f"t (s, 0 = soak start; {bucket:g} s windows)", "health max ms",
                  "gateway RSS max MB"], timeline), "",
        f"Baseline health checks: {len(base_health)}, worst "
        f"{max(base_health, default=nan) * 1000:,.0f} ms.",
    ]  # fmt: skip
    return report(
        args, info, "Soak: well-behaved callers among hostile ones (issues 13 and 24)",
        f"baseline {base.seconds:.0f} s, soak {soak.seconds:.0f} s",
        f"callers, gateway and hostile traffic share this machine's cores. {args.callers} "
        f"well-behaved callers; `--max-message-bytes {MAX_MESSAGE_BYTES}`, other limits "
        f"default; `--hostile-doors {args.hostile_doors}`.",
        targets, {"baseline (alone)": base, "soak (with hostile traffic)": soak}, rest, alive,
    )  # fmt: skip


# ---------------------------------------------------------------------------- faults
@dataclass
class Fault:
    """One kill and restart: when it went down and when it was ready again."""

    what: str
    down_at: float
    up_at: float = float("nan")


async def faults(args: argparse.Namespace, info: list[tuple[str, str]]) -> str:
    repository = h.model_repository(h.DEMO_MODEL)
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
        async with h.channel(gateway.target) as channel:
            good = WellBehaved(channel, keep_vectors=True)
            events: list[Fault] = []
            section(f"soak: {args.callers} callers, Redis then Triton killed, {args.seconds:g} s")
            good.t0 = time.perf_counter()
            driver = asyncio.create_task(inject(args, redis, triton, events, good.t0))
            async with h.every(5.0, lambda: fault_progress(good)):
                result = await h.closed_loop(
                    good.call, label="faults", concurrency=args.callers, seconds=args.seconds,
                    max_seconds=args.seconds + 120,
                )  # fmt: skip
                await asyncio.wait_for(driver, 600)
        alive = gateway.running
        section("clean run: a gateway without cache on the same Triton")
        with h.gateway(
            repository, "soak-clean", backend="triton", triton_url=triton.grpc_url,
            local_cache_items=0,
        ) as clean:  # fmt: skip
            reference, self_check = await clean_vectors(clean.target, good)
    return faults_report(args, info, result, good, events, reference, self_check, alive)


async def inject(args: argparse.Namespace, redis, triton, events: list[Fault], t0: float) -> None:
    """Kill and restart Redis `--redis-kills` times (in the first 35 % of the run), then
    Triton `--triton-kills` times; each SIGKILLed (its group) and down `--down-seconds`."""
    now = lambda: time.perf_counter() - t0  # noqa: E731

    async def down_and_up(at: float, what: str, server) -> Fault:
        await asyncio.sleep(max(0.0, at - now()))
        events.append(event := Fault(what, now()))
        await asyncio.to_thread(server.kill)
        print(f"  t={now():5.1f}s  {what} killed", flush=True)
        await asyncio.sleep(args.down_seconds)
        await asyncio.to_thread(server.start)
        event.up_at = now()
        print(f"  t={now():5.1f}s  {what} ready", flush=True)
        return event

    for i in range(args.redis_kills):
        await down_and_up(
            args.seconds * (0.08 + 0.27 * i / max(1, args.redis_kills)), "redis", redis
        )
    restart_s = 15.0  # a guess until the first restart is measured
    for i in range(args.triton_kills):
        planned = args.seconds * (0.4 + 0.5 * i / max(1, args.triton_kills))
        if events and events[-1].what == "triton":
            planned = max(planned, events[-1].up_at + 5.0)
        if planned + args.down_seconds + restart_s + 5.0 > args.seconds:
            print(f"  t={now():5.1f}s  no time left for Triton kill {i + 1}", flush=True)
            break
        event = await down_and_up(planned, "triton", triton)
        restart_s = event.up_at - event.down_at - args.down_seconds


def fault_progress(good: WellBehaved) -> None:
    print(
        f"  t={time.perf_counter() - good.t0:5.0f}s  distinct (input, vector) pairs "
        f"{sum(len(v) for v in good.vectors.values())}  errors {len(good.errors)}", flush=True,
    )  # fmt: skip


async def clean_vectors(target: str, good: WellBehaved) -> tuple[dict, tuple[int, int, float]]:
    """Every input seen, embedded once more by a gateway with no cache; and that gateway
    against itself: its first 32 texts one per call against the same in one call of 64
    (equal bit for bit, of, largest difference)."""
    reference: dict[tuple[str, str], bytes] = {}
    async with h.channel(target) as channel:
        raw = RawClip(channel)

        texts = sorted(t for kind, t in good.vectors if kind == "text")
        for i in range(0, len(texts), 64):
            chunk = texts[i : i + 64]
            reference |= {
                ("text", t): v for t, v in zip(chunk, await embed(raw, "text", chunk), strict=True)
            }
        equal, worst, first = 0, 0.0, texts[:32]
        for text in first:
            alone, together = (await embed(raw, "text", [text]))[0], reference[("text", text)]
            equal += alone == together
            diff = np.abs(np.frombuffer(alone, "<f4") - np.frombuffer(together, "<f4"))
            worst = max(worst, float(diff.max()))
        for k, jpeg_bytes in enumerate(good.jpegs):
            reference[("image", str(k))] = (await embed(raw, "image", [jpeg_bytes]))[0]
    return reference, (equal, len(first), worst)


def faults_report(
    args: argparse.Namespace, info: list, result: LoadResult, good: WellBehaved,
    events: list[Fault], reference: dict, self_check: tuple[int, int, float], alive: bool,
) -> str:  # fmt: skip
    tritons = [e for e in events if e.what == "triton"]
    # An error belongs to a Triton outage when it ended between the kill and the moment
    # Triton was ready again; one ending up to 2 s later is recovery; any other is a miss.
    during, recovery, outside = [], [], []
    recovery_s = {id(e): 0.0 for e in tritons}
    for start, end, code in good.errors:
        if any(e.down_at <= end <= e.up_at for e in tritons):
            during.append(code)
            continue
        # Recovery belongs to the latest restart before the error, within 30 s of it.
        back = max(
            (e for e in tritons if e.up_at < end <= e.up_at + 30.0),
            key=lambda e: e.up_at, default=None,
        )  # fmt: skip
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
    for key, seen in good.vectors.items():
        if (ref := reference.get(key)) is None:
            continue
        want = np.frombuffer(ref, "<f4")
        for packed in seen:
            compared, got = compared + 1, np.frombuffer(packed, "<f4")
            if packed == ref:
                equal += 1
                continue
            diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else 1.0
            worst_diff, close = max(worst_diff, diff), close + (diff <= CLOSE)
    targets = [
        ["well-behaved errors outside Triton's outage (and its 2 s)", "0",
         f"{len(outside)} ({h.codes_text([c for *_, c in outside])})", verdict(not outside)],
        ["errors after Triton was ready again, longest", "≤ 2 s",
         f"{worst_recovery:.2f} s (over {len(tritons)} restarts)",
         verdict(worst_recovery <= RECOVERY_TARGET_S)],
        ["distinct vectors equal to the clean run's, bit for bit", "all",
         f"{equal} of {compared}" + (f" (max abs diff {worst_diff:.1e})" * (compared != equal)),
         verdict(compared == equal and compared > 0)],
        [f"the rest within {CLOSE:g} of it (largest abs difference per element)", "–",
         f"{close} of {compared - equal}", "info"],
        ["well-behaved p99 over the whole run (outages included)", "–",
         f"{fmt(result.percentile_ms(99))} ms", "info"],
    ]  # fmt: skip
    event_rows = [
        [e.what, f"{e.down_at:.1f}", f"{e.up_at:.1f}", f"{e.up_at - e.down_at:.1f}",
         f"{recovery_s.get(id(e), 0.0):.2f}" if e.what == "triton" else "–"]
        for e in events
    ]  # fmt: skip
    inconsistent = sum(len(seen) > 1 for seen in good.vectors.values())
    rest = [
        f"Errors during Triton's outages ({sum(e.up_at - e.down_at for e in tritons):.1f} s in "
        f"all): {len(during)} ({h.codes_text(during)}); within 2 s after: {len(recovery)}. "
        f"Inputs answered with more than one distinct vector: {inconsistent} of "
        f"{len(good.vectors)}.", "",
        "Float32 results of one input differ in the last bits across batch sizes; the clean "
        f"gateway against itself, with nothing killed: {self_check[1]} texts one per call "
        f"against the same in one call of 64: {self_check[0]} of {self_check[1]} equal bit for "
        f"bit, largest difference {self_check[2]:.1e}.", "",
        "## Faults (seconds from the start of the soak)", "",
        md_table(["what", "killed at", "ready at", "outage s", "errors after ready, s"],
                 event_rows),
    ]  # fmt: skip
    if outside:
        rows = [[f"{s:.1f}", f"{e:.1f}", c] for s, e, c in outside[:20]]
        rest += ["", "Errors outside the outages (first 20):", "",
                 md_table(["call start s", "call end s", "code"], rows)]  # fmt: skip
    return report(
        args, info, "Soak: well-behaved callers while Redis and Triton are killed (issue 14)",
        f"{result.seconds:.0f} s", "tritonserver, redis-server, the gateway and the callers "
        f"share this machine's cores. {args.callers} well-behaved callers; Redis SIGKILLed "
        f"{args.redis_kills}×, Triton {len(tritons)}×, each down {args.down_seconds:g} s.",
        targets, {"with faults": result}, rest, alive,
    )  # fmt: skip


# ---------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = h.parser(__doc__, model=None)
    p.add_argument("--mode", choices=("hostile", "faults"), required=True)
    p.add_argument("--seconds", type=float, default=300.0, help="the soak (issue: 300)")
    p.add_argument("--baseline-seconds", type=float, default=0.0, help="hostile: the callers "
                   "alone first (default: a third of --seconds)")  # fmt: skip
    p.add_argument("--warmup-seconds", type=float, default=0.0, help="hostile: RSS is judged "
                   "after this much of the soak (default: a fifth of it)")  # fmt: skip
    p.add_argument("--callers", type=int, default=4)
    p.add_argument("--hostile-gap-s", type=float, default=0.5, help="hostile: pause between calls")
    p.add_argument("--hostile-doors", choices=("both", "grpc", "http"), default="both",
                   help="hostile: the hostile kinds of both doors, or of one")  # fmt: skip
    p.add_argument("--redis-kills", type=int, default=3)
    p.add_argument("--triton-kills", type=int, default=3)
    p.add_argument("--down-seconds", type=float, default=2.0, help="faults: time left dead")
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
