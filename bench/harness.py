"""The one harness every benchmark uses: models, inputs, servers, load, rounds, reports.

Which pieces it holds and why: bench/README.md, "The harness".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import itertools
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from PIL import Image
from tqdm import tqdm

from bench.captions import short_caption
from service.processes.gateway import GatewayProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MODELS_DIR = REPO_ROOT / "bench" / ".models"
DEMO_MODEL = "clip-demo-shapes"
MODELS = (DEMO_MODEL, "ViT-B-32")
DEMO_WEIGHTS = REPO_ROOT / "demo" / "clip-demo-shapes.pt"
SERVICE = "/clip.v1.ClipService/"
PHOTO = (640, 480)
T = TypeVar("T")

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------- models
def model_repository(model: str, pretrained: str | None = None) -> Path:
    """`model`'s exported repository, cached in bench/.models/ (demo: its trained weights)."""
    if pretrained is None:
        pretrained = str(DEMO_WEIGHTS) if model == DEMO_MODEL and DEMO_WEIGHTS.is_file() else "none"
    tag = "none"
    if pretrained != "none":  # a retrained checkpoint gets a new folder, not a stale export
        stat = Path(pretrained).stat()
        tag = f"{Path(pretrained).stem}-{stat.st_size}-{int(stat.st_mtime)}"
    return exported(MODELS_DIR / f"{model}-{tag}", model, pretrained)


def exported(target: Path, model: str, pretrained: str, **options: Any) -> Path:
    """`target`, exported by `export_model` unless already there (atomically: .partial)."""
    if (target / "metadata.json").is_file():
        return target
    from service.model.export import export_model

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"exporting {model} ({pretrained}) → {target} ...", flush=True)
    options.setdefault("flavor", "python")
    summary = export_model(model, pretrained, partial, progress=True, **options)
    partial.rename(target)
    print(f"exported in {summary.seconds:.1f}s", flush=True)
    return target


def repository_variant(repository: Path, torch_threads: int) -> Path:
    """`repository` with TORCH_THREADS set in both Triton configs (weights symlinked)."""
    if torch_threads <= 0:
        return repository
    target = repository.with_name(f"{repository.name}-t{torch_threads}")
    key = 'key: "TORCH_THREADS" value: {{ string_value: "{}" }}'
    for path in [] if (target / "metadata.json").is_file() else sorted(repository.rglob("*")):
        dest = target / path.relative_to(repository)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            dest.mkdir(exist_ok=True)
        elif path.name == "config.pbtxt":
            dest.write_text(path.read_text().replace(key.format(0), key.format(torch_threads)))
        elif not dest.exists():
            dest.symlink_to(path.resolve())
    return target


# ---------------------------------------------------------------------------- servers
def gateway(repository: Path, log_name: str = "gateway", **settings: object) -> GatewayProcess:
    """`clipsvc serve` in its own process (a context manager; `settings` are serve flags)."""
    return GatewayProcess(repository, log_name=log_name, **settings)


def triton(repository: Path, *, torch_threads: int = 0, **options: Any) -> Any:
    """A real `tritonserver` on `repository` (a context manager), `TORCH_THREADS` applied."""
    from service.processes.triton_server import TritonProcess

    options.setdefault("startup_timeout_s", 300)
    return TritonProcess(repository_variant(repository, torch_threads), **options)


def redis() -> Any:
    """A real `redis-server` on a free port (a context manager)."""
    from service.processes.redis_server import RedisServer

    return RedisServer()


# ---------------------------------------------------------------------------- inputs
def source_photos() -> list[Image.Image]:
    """Real photos that ship inside scikit-image and scikit-learn (no download)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    arrays += list(load_sample_images().images)
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def photo_pool(n: int, size: tuple[int, int] = PHOTO, *, seed: int = 0) -> list[bytes]:
    """`n` distinct JPEGs (quality 90) of `size` (w, h): random crops and flips of real photos."""
    rng = np.random.default_rng(seed)
    sources = source_photos()
    out: list[bytes] = []
    for i in range(n):
        src = sources[i % len(sources)]
        crop_w = min(src.width, int(src.height * size[0] / size[1])) * rng.uniform(0.55, 1.0)
        crop_h = crop_w * size[1] / size[0]
        left, top = rng.uniform(0, src.width - crop_w), rng.uniform(0, src.height - crop_h)
        box = (left, top, left + crop_w, top + crop_h)
        img = src.resize(size, Image.Resampling.BICUBIC, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def unique_jpeg(jpeg: bytes, tag: int) -> bytes:
    """The picture with a JPEG comment holding `tag`: new bytes (no cache hit), same decode."""
    payload = f"bench {tag}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def decoded(jpegs: Sequence[bytes], metadata: Any) -> np.ndarray:
    """`jpegs` decoded as the gateway decodes them: uint8 [N, 3, S, S]."""
    from service.core.image_preprocess import ImageLimits, ImageSpec, preprocess_image_bytes

    spec = ImageSpec(metadata.image_size, metadata.interpolation)
    limits = ImageLimits(20 * 1024 * 1024, 50_000_000, True)
    return np.stack([preprocess_image_bytes(j, spec, limits) for j in jpegs])


def photo_note(jpegs: Sequence[bytes], size: tuple[int, int] = PHOTO) -> str:
    """`640×480 JPEG photos (mean 60 KiB)`."""
    mean_kib = np.mean([len(j) for j in jpegs]) / 1024
    return f"{size[0]}×{size[1]} JPEG photos (mean {mean_kib:.0f} KiB)"


# ---------------------------------------------------------------------------- load
@dataclass
class LoadResult:
    """One measured point: calls, items, wall time, per-call latencies, errors by code."""

    label: str
    concurrency: int
    calls: int = 0
    items: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    counters: dict[str, float] = field(default_factory=dict)  # their change over the point

    @property
    def items_per_s(self) -> float:
        """Items (images or texts) embedded per second of wall time."""
        return self.items / self.seconds if self.seconds else 0.0

    @property
    def calls_per_s(self) -> float:
        """Successful calls per second of wall time."""
        return len(self.latencies_s) / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        """Latency percentile `q` (0-100) of successful calls, in milliseconds."""
        return percentile_ms(self.latencies_s, q)

    @property
    def error_text(self) -> str:
        """`CODE×n, ...` or `0`."""
        return codes_text(self.errors, "0")


def percentile_ms(latencies_s: Sequence[float], q: float) -> float:
    """Percentile `q` of `latencies_s`, in ms; NaN when empty."""
    return float(np.percentile(latencies_s, q) * 1000.0) if len(latencies_s) else float("nan")


def codes_text(codes: Counter[str] | Sequence[str], empty: str = "none") -> str:
    """`CODE×n, ...` (sorted by code), or `empty`."""
    counts = codes if isinstance(codes, Counter) else Counter(codes)
    return ", ".join(f"{k}×{v}" for k, v in sorted(counts.items())) or empty


class CallFailed(Exception):
    """A failed call that is not a gRPC one (an HTTP status), counted by `code`."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


FAILED_CALL = (grpc.aio.AioRpcError, CallFailed)


def error_code(exc: BaseException) -> str:
    """The name a failed call is counted under."""
    return exc.code if isinstance(exc, CallFailed) else exc.code().name  # type: ignore[attr-defined]


async def closed_loop(
    call: Callable[[int], Awaitable[int]],
    *,
    label: str,
    concurrency: int,
    seconds: float,
    min_calls: int = 0,
    max_calls: int = 0,
    warmup_rounds: int = 1,
    max_seconds: float = 600.0,
    progress: bool = True,
    counter: Iterator[int] | None = None,
    before_measure: Callable[[], None] | None = None,
    counters: Callable[[], dict[str, float]] | None = None,
) -> LoadResult:
    """`concurrency` callers, each calling again as soon as its answer arrives.

    `call(i)` gets a new number (distinct inputs) and returns the items it embedded; a gRPC
    error or `CallFailed` counts under its code. After `warmup_rounds` unmeasured calls per
    caller and `before_measure()`, the point lasts `seconds` and ≥ `min_calls` calls (≤
    `max_calls`); calls in flight at the end count. `counters()` is read with nothing in
    flight and again at the end: `result.counters` holds each one's change.
    """
    counter = counter if counter is not None else itertools.count()

    async def warm() -> None:
        for _ in range(warmup_rounds):
            with contextlib.suppress(*FAILED_CALL):
                await call(next(counter))

    await asyncio.gather(*(warm() for _ in range(concurrency)))
    if before_measure is not None:
        before_measure()
    marks = counters() if counters else {}
    result, started = LoadResult(label, concurrency), time.perf_counter()
    stop_at, hard_stop = started + seconds, started + max_seconds
    bar = tqdm(
        total=round(seconds, 1), desc=label, unit="s", leave=False,
        disable=None if progress else True,  # None: off when stderr is not a terminal
        bar_format="{desc}: {bar:20} {n:.1f}/{total:.1f}s {postfix}",
    )  # fmt: skip

    async def caller() -> None:
        while True:
            now = time.perf_counter()
            if (now >= stop_at and result.calls >= min_calls) or now >= hard_stop:
                return
            if max_calls and result.calls >= max_calls:
                return
            result.calls += 1  # counted at start so min_calls is not overshot by the callers
            begin = time.perf_counter()
            try:
                # Not `result.items += await ...`: that reads `items` before the await and
                # writes it back after, losing every other caller's updates meanwhile.
                done = await call(next(counter))
            except FAILED_CALL as exc:
                result.errors[error_code(exc)] += 1
            else:
                result.items += done
                result.latencies_s.append(time.perf_counter() - begin)

    def tick() -> None:
        elapsed = time.perf_counter() - started
        bar.n = min(round(elapsed, 1), bar.total)
        bar.set_postfix_str(
            f"{len(result.latencies_s)} ok, {sum(result.errors.values())} err, "
            f"{result.items / max(elapsed, 1e-9):.1f} items/s"
        )

    try:
        async with every(0.5, tick):
            await asyncio.gather(*(caller() for _ in range(concurrency)))
    finally:
        bar.close()
    result.seconds = time.perf_counter() - started
    if counters:
        result.counters = {key: value - marks[key] for key, value in counters().items()}
    return result


async def timed_loop(
    step: Callable[[int], int], *, label: str, seconds: float, min_iters: int = 3
) -> LoadResult:
    """In-process `step(i)` (returns items) as a one-caller `closed_loop`, 2 warm-up calls."""

    async def call(i: int) -> int:
        await asyncio.sleep(0)  # the progress bar ticks between batches
        return step(i)

    return await closed_loop(
        call, label=label, concurrency=1, seconds=seconds, min_calls=min_iters, warmup_rounds=2
    )


class RawClip:
    """ClipService methods on raw bytes: the load generator serializes ahead, parses nothing."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        from service.api.clip.v1 import clip_pb2

        method = lambda name: channel.unary_unary(SERVICE + name)  # noqa: E731
        self.embed_text, self.embed_image = method("EmbedText"), method("EmbedImage")
        self.similarity, self.classify = method("Similarity"), method("Classify")
        self.embed_stream = channel.stream_stream(
            SERVICE + "EmbedStream",
            request_serializer=clip_pb2.StreamRequest.SerializeToString,
            response_deserializer=clip_pb2.StreamResponse.FromString,
        )


def channel(target: str) -> grpc.aio.Channel:
    """An insecure channel to `target` with 64 MiB messages both ways (the service's limit)."""
    size = 64 * 1024 * 1024
    options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
    return grpc.aio.insecure_channel(target, options=options)


def grpc_calls(
    client: RawClip,
    jpegs: Sequence[bytes],
    caption: Callable[[int], str] = short_caption,
    *,
    pick: Callable[[int], int] = lambda i: i,
    timeout_s: float = 600.0,
) -> dict[str, Callable[[int], Awaitable[int]]]:
    """One single-item EmbedImage / EmbedText call per `i`, packed float32 answers: photo
    `pick(i)` with new bytes, or `caption(pick(i))` (`pick`: a warm set or a fresh range)."""
    from service.api.clip.v1 import clip_pb2

    packed = clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES

    async def image(i: int) -> int:
        n = pick(i)
        request = clip_pb2.EmbedImageRequest(
            images=[unique_jpeg(jpegs[n % len(jpegs)], n)], format=packed
        )
        await client.embed_image(request.SerializeToString(), timeout=timeout_s)
        return 1

    async def text(i: int) -> int:
        request = clip_pb2.EmbedTextRequest(texts=[caption(pick(i))], format=packed)
        await client.embed_text(request.SerializeToString(), timeout=timeout_s)
        return 1

    return {"image": image, "text": text}


def http_text_call(
    session: Any, url: str, caption: Callable[[int], str]
) -> Callable[[int], Awaitable[int]]:
    """One single-text `POST /v1/embeddings` (base64, the openai client's default) per call."""

    async def call(i: int) -> int:
        body = {"model": "clip", "input": caption(i), "encoding_format": "base64"}
        headers = {"Content-Type": "application/json"}
        async with session.post(url, data=json.dumps(body).encode(), headers=headers) as answer:
            await answer.read()
            if answer.status != 200:
                raise CallFailed("RESOURCE_EXHAUSTED" if answer.status == 429 else "UNKNOWN")
        return 1

    return call


# ---------------------------------------------------------------------------- rounds
async def interleaved(
    rounds: int,
    points: Sequence[str],
    measure: Callable[[int, str], Awaitable[T]],
    *,
    step: int = 1,
) -> list[dict[str, T]]:
    """`rounds` rounds measuring every point once, round r shifted `r × step` points so a slow
    minute hits every point alike; each round's dict is in the order its points ran."""
    out: list[dict[str, T]] = []
    for r in range(rounds):
        shift = (r * step) % len(points)
        order = [*points[shift:], *points[:shift]]
        out.append({point: await measure(r + 1, point) for point in order})
    return out


@contextlib.asynccontextmanager
async def every(seconds: float, tick: Callable[[], object]) -> AsyncIterator[None]:
    """Calls `tick()` every `seconds` while the block runs."""

    async def loop() -> None:
        while True:
            tick()
            await asyncio.sleep(seconds)

    task = asyncio.get_running_loop().create_task(loop())
    try:
        yield
    finally:
        task.cancel()


def spread(values: Sequence[float], unit: str = "×") -> str:
    """`median (min–max)` of per-round ratios."""
    return f"{np.median(values):.2f}{unit} ({min(values):.2f}–{max(values):.2f})"


# ---------------------------------------------------------------------------- processes
def memory_mb(pid: int) -> tuple[float, float]:
    """(resident set size, peak resident set size) of `pid` in MB, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        kb = dict(line.split()[:2] for line in status if line.startswith(("VmRSS:", "VmHWM:")))
    rss, peak = (float(kb.get(key, "nan")) / 1024.0 for key in ("VmRSS:", "VmHWM:"))
    return rss, peak


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU seconds of `pid` (or `self/task/<tid>`) so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_total(pgid: int | None, read: Callable[[int], float]) -> float:
    """`read(pid)` summed over the live members of a process group (Triton and its stubs)."""
    from service.processes.child_server import group_members

    total = 0.0
    for pid in group_members(pgid) if pgid is not None else ():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += read(pid)
    return total


def triton_stats(url: str, models: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(inference_count, execution_count) per model from Triton's statistics API."""
    import tritonclient.grpc as triton_grpc

    client, out = triton_grpc.InferenceServerClient(url), {}
    try:
        for m in models:
            s = client.get_inference_statistics(m, as_json=True)["model_stats"][0]
            out[m] = (int(s.get("inference_count", 0)), int(s.get("execution_count", 0)))
    finally:
        client.close()
    return out


# ---------------------------------------------------------------------------- reports
def machine_info(torch_threads: int | None = None) -> list[tuple[str, str]]:
    """What the figures were measured on (and the threading, when `torch_threads` is given)."""
    import torch

    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), cpu)
    gpu = "none"
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "rev-parse", "--short", "HEAD"]
        run = subprocess.run(git, cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        commit = run.stdout.strip() or "?"
    info = [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("cpu", f"{cpu}, {len(os.sched_getaffinity(0))} cores usable"),
        ("gpu", gpu),
        ("load average at start (1, 5, 15 min)", ", ".join(f"{v:.2f}" for v in os.getloadavg())),
        ("python / torch", f"{platform.python_version()} / {torch.__version__}"),
        ("git commit", commit),
    ]
    if torch_threads is not None:
        threads = torch_threads or torch.get_num_threads()
        policy = os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default: spin, then sleep)")
        info.append(("threads", f"torch intra-op threads {threads}, OMP_WAIT_POLICY {policy}"))
    return info


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def report_head(title: str, info: Sequence[tuple[str, str]]) -> list[str]:
    """A report's first lines: the title and the machine table."""
    return [f"# {title}", "", md_table(["", ""], info), ""]


def report(
    title: str, info: Sequence[tuple[str, str]], sections: dict[str, str | Sequence[str]],
    intro: str = "",
) -> str:  # fmt: skip
    """`report_head`, `intro`, then each `## name` and its lines (or one string)."""
    lines = report_head(title, info) + ([intro, ""] if intro else [])
    for name, body in sections.items():
        lines += [f"## {name}", "", *([body] if isinstance(body, str) else body), ""]
    return "\n".join(lines)


def fmt(value: float, digits: int = 1) -> str:
    """A number for a table: fixed digits, `–` for NaN."""
    if math.isnan(value):
        return "–"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"


def verdict(ok: bool) -> str:
    """A target's verdict."""
    return "PASS" if ok else "MISS"


def section(title: str) -> None:
    """A visible header in the console output."""
    print(f"\n=== {title} ===", flush=True)


def write_result(out: Path, text: str, summary: str, *extra_files: Path) -> None:
    """Write a report to `out` (its folder made), print `=== summary ===` and what was written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    section("summary")
    print(summary)
    print("wrote " + " and ".join(str(p) for p in (out, *extra_files)), flush=True)


# ---------------------------------------------------------------------------- entry points
# OMP_WAIT_POLICY=PASSIVE unless told otherwise: spinning OpenMP workers steal the shared
# cores (bench/README.md, "Threads"); `--omp-wait-policy inherit` measures that on purpose.


def parser(
    doc: str | None, *, out: str | None = None, model: str | None = DEMO_MODEL, threads: bool = True
) -> argparse.ArgumentParser:
    """A scenario's parser: `--model`, `--out` (bench/results/<out>), threading flags."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if model is not None:
        p.add_argument("--model", default=model, choices=MODELS)
    if out is not None:
        p.add_argument("--out", type=Path, default=RESULTS_DIR / out)
    if threads:
        p.add_argument("--torch-threads", type=int, default=0, help="intra-op threads (0: torch's)")
        p.add_argument(
            "--omp-wait-policy", choices=("PASSIVE", "ACTIVE", "inherit"), default="PASSIVE",
            help="OMP_WAIT_POLICY of every process of the run; inherit = leave the environment",
        )  # fmt: skip
    return p


def apply_threading(args: argparse.Namespace, module: str) -> None:
    """Re-exec `module` with the asked OMP_WAIT_POLICY (OpenMP reads it once, at load)."""
    policy = getattr(args, "omp_wait_policy", "inherit")
    if policy == "inherit" or os.environ.get("OMP_WAIT_POLICY") == policy:
        return
    sys.stdout.flush()
    argv = [sys.executable, "-m", module, *sys.argv[1:]]
    os.execve(sys.executable, argv, {**os.environ, "OMP_WAIT_POLICY": policy})


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C: the `with` blocks stopping servers unwind."""

    def _interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)


def main(
    module: str,
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], Coroutine[object, object, int | None]],
) -> int:
    """A benchmark's entry point: its threading environment, SIGTERM as Ctrl-C, `run`."""
    apply_threading(args, module)
    interrupt_on_sigterm()
    return asyncio.run(run(args)) or 0
