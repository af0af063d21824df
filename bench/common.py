"""Shared parts of the benchmarks: models, inputs, load loops, reports.

Every figure a benchmark prints is measured in the same run as its baseline, so a
ratio holds on a noisy shared machine even when the absolute numbers do not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import itertools
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MODELS_DIR = REPO_ROOT / "bench" / ".models"
DEMO_MODEL = "clip-demo-shapes"
DEMO_WEIGHTS = REPO_ROOT / "demo" / "clip-demo-shapes.pt"
SERVICE = "/clip.v1.ClipService/"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------- models
def model_repository(model: str, pretrained: str | None = None) -> Path:
    """An exported (python-flavor) repository for `model`, cached under `bench/.models/`.

    The demo model uses its trained weights when `demo/clip-demo-shapes.pt` exists and
    random ones otherwise: the speed is the same, only the vectors differ.
    """
    if pretrained is None:
        pretrained = str(DEMO_WEIGHTS) if model == DEMO_MODEL and DEMO_WEIGHTS.is_file() else "none"
    if pretrained == "none":
        tag = "none"
    else:
        stat = Path(pretrained).stat()
        # A retrained checkpoint gets a new folder instead of a stale export.
        tag = f"{Path(pretrained).stem}-{stat.st_size}-{int(stat.st_mtime)}"
    target = MODELS_DIR / f"{model}-{tag}"
    if (target / "metadata.json").is_file():
        return target
    from service.model.export import export_model
    from service.settings import BatchingOptions

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"exporting {model} ({pretrained}) → {target} ...", flush=True)
    summary = export_model(
        model, pretrained, partial, flavor="python", batching=BatchingOptions(), progress=True
    )
    partial.rename(target)
    if pretrained != "none":
        # Exports of earlier versions of the same checkpoint are never used again.
        prefix = f"{model}-{Path(pretrained).stem}-"
        for stale in MODELS_DIR.glob(prefix + "*"):
            if stale != target and not stale.name.endswith(".partial"):
                shutil.rmtree(stale, ignore_errors=True)
    print(f"exported in {summary.seconds:.1f}s", flush=True)
    return target


# ---------------------------------------------------------------------------- inputs
def source_photos() -> list[Image.Image]:
    """Real photos that ship inside scikit-image and scikit-learn (no download)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    arrays += list(load_sample_images().images)
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def photo_pool(n: int, size: tuple[int, int], *, seed: int = 0, quality: int = 90) -> list[bytes]:
    """`n` distinct JPEGs of `size` (w, h): random crops and flips of the real photos."""
    rng = np.random.default_rng(seed)
    sources = source_photos()
    out: list[bytes] = []
    target_w, target_h = size
    for i in range(n):
        src = sources[i % len(sources)]
        aspect = target_w / target_h
        scale = rng.uniform(0.55, 1.0)
        crop_w = min(src.width, int(src.height * aspect)) * scale
        crop_h = crop_w / aspect
        left = rng.uniform(0, src.width - crop_w)
        top = rng.uniform(0, src.height - crop_h)
        img = src.resize(
            (target_w, target_h),
            Image.Resampling.BICUBIC,
            box=(left, top, left + crop_w, top + crop_h),
        )
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def unique_jpeg(jpeg: bytes, tag: int) -> bytes:
    """The same picture with a JPEG comment holding `tag`: other bytes, same decode work.

    Cache keys hash the encoded bytes, so this defeats caching and single-flight
    dedup without changing what the gateway has to decode.
    """
    payload = f"bench {tag}".encode()
    comment = b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + comment + jpeg[2:]


_OPENERS = ("a photo of", "a picture of", "an image of", "a close-up of", "a blurry photo of")
_ADJS = (
    "small", "big", "old", "young", "happy", "sleepy", "wet", "shiny", "tiny", "large",
    "dirty", "clean", "fast", "slow", "wooden", "tall", "short", "fluffy", "broken", "new",
    "angry", "quiet", "bright", "dark",
)  # fmt: skip
_COLORS = (
    "red", "blue", "green", "yellow", "black", "white", "brown", "orange", "pink", "grey",
    "purple", "golden",
)  # fmt: skip
_NOUNS = (
    "dog", "cat", "horse", "car", "bus", "train", "boat", "bird", "man", "woman", "child",
    "bike", "truck", "cow", "sheep", "bear", "plane", "chair", "table", "house", "tree",
    "flower", "bottle", "cup", "pizza", "cake", "phone", "laptop", "book", "clock", "kite",
    "ball", "umbrella", "bag", "hat", "shoe", "lamp", "door", "window", "bridge", "tower",
    "river", "road", "fence", "bench", "sign", "boy", "girl",
)  # fmt: skip
_VERBS = (
    "sitting", "standing", "running", "lying", "waiting", "parked", "walking", "sleeping",
    "jumping", "playing", "resting", "floating", "hanging", "flying", "eating", "looking",
    "moving", "stopped", "shown", "seen",
)  # fmt: skip
_PREPS = ("on", "in", "near", "behind", "under", "beside", "at", "by")
_PLACES = (
    "beach", "street", "park", "kitchen", "table", "grass", "snow", "road", "field", "lake",
    "city", "forest", "garden", "room", "station", "airport", "desert", "hill", "bed",
    "sofa", "market", "river", "shop", "farm", "bridge", "wall", "sand", "water", "floor",
    "window", "roof", "mountain",
)  # fmt: skip
_JOINERS = (", while", " and", ", next to", ", with", ", behind")
_RADIX = (len(_OPENERS), len(_ADJS), len(_COLORS), len(_NOUNS), len(_VERBS), len(_PREPS))
_SPACE = int(np.prod(_RADIX)) * len(_PLACES)
_SCRAMBLE = 1_000_003  # a prime that divides no radix: i → i·P mod N is a bijection


def _clause(index: int, *, opener: bool) -> str:
    j = (index * _SCRAMBLE) % _SPACE
    digits = []
    for radix in (*_RADIX, len(_PLACES)):
        digits.append(j % radix)
        j //= radix
    o, a, c, n, v, p, pl = digits
    head = f"{_OPENERS[o]} a" if opener else "a"
    return f"{head} {_ADJS[a]} {_COLORS[c]} {_NOUNS[n]} {_VERBS[v]} {_PREPS[p]} the {_PLACES[pl]}"


# How many clauses a caption of each class has, and the share of each class in the mix:
# mostly one-line captions and queries, some descriptive ones, a few alt-texts, and a
# few past the 77-token context (truncated).
CAPTION_MIX: tuple[tuple[str, int, int], ...] = (
    ("short", 1, 55),
    ("medium", 2, 25),
    ("long", 4, 15),
    ("over 77", 11, 5),
)


def short_caption(index: int) -> str:
    """Caption `index` of a set of distinct ones, each ≤ 16 tokens with start and end."""
    return _clause(index, opener=True)


def mixed_caption(index: int) -> str:
    """Caption `index` of a realistic mix of lengths (see CAPTION_MIX); distinct per index."""
    pick = (index * 2654435761) % 100
    clauses = CAPTION_MIX[-1][1]
    for _, n, share in CAPTION_MIX:
        if pick < share:
            clauses = n
            break
        pick -= share
    parts = [_clause(index, opener=True)]
    for k in range(1, clauses):
        joiner = _JOINERS[(index + k) % len(_JOINERS)]
        parts.append(f"{joiner} {_clause(index * 7919 + k * 104729, opener=False)}")
    return "".join(parts)


# ---------------------------------------------------------------------------- stats
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
    extra: dict[str, float] = field(default_factory=dict)

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
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_s), q) * 1000.0)

    @property
    def error_text(self) -> str:
        """`CODE×n, ...` or `0`."""
        return ", ".join(f"{k}×{v}" for k, v in sorted(self.errors.items())) or "0"


class _Ticker:
    """A tqdm bar over a time budget, advanced from a background task."""

    def __init__(self, desc: str, seconds: float, result: LoadResult, enabled: bool) -> None:
        self.bar = tqdm(
            total=round(seconds, 1),
            desc=desc,
            unit="s",
            leave=False,
            disable=None if enabled else True,  # None: off when stderr is not a terminal
            bar_format="{desc}: {bar:20} {n:.1f}/{total:.1f}s {postfix}",
        )
        self.result = result
        self.started = time.perf_counter()

    def update(self) -> None:
        elapsed = time.perf_counter() - self.started
        self.bar.n = min(round(elapsed, 1), self.bar.total)
        ok = len(self.result.latencies_s)
        self.bar.set_postfix_str(
            f"{ok} ok, {sum(self.result.errors.values())} err, "
            f"{self.result.items / max(elapsed, 1e-9):.1f} items/s"
        )

    def close(self) -> None:
        self.bar.close()


async def closed_loop(
    call: Callable[[int], Awaitable[int]],
    *,
    label: str,
    concurrency: int,
    seconds: float,
    min_calls: int = 0,
    warmup_rounds: int = 1,
    max_seconds: float = 600.0,
    progress: bool = True,
    counter: Iterator[int] | None = None,
    before_measure: Callable[[], None] | None = None,
) -> LoadResult:
    """`concurrency` callers, each calling again as soon as its answer arrives.

    `call(i)` gets a number never given before (for distinct inputs) and returns how
    many items it embedded. Each caller first makes `warmup_rounds` unmeasured calls
    (TorchScript specializes on the first shapes it sees; batches need to fill), then
    all start together. The point lasts `seconds` and at least `min_calls` calls; calls
    in flight at the end are finished and counted, so with batches the window starts
    and ends on batch boundaries instead of cutting one in half. `before_measure` runs
    between the warm-up and the measured calls (to read counters).
    """
    counter = counter if counter is not None else itertools.count()

    async def warm() -> None:
        for _ in range(warmup_rounds):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call(next(counter))

    await asyncio.gather(*(warm() for _ in range(concurrency)))
    if before_measure is not None:
        before_measure()  # nothing is in flight here: a clean mark for counters
    result = LoadResult(label, concurrency)
    started = time.perf_counter()
    stop_at, hard_stop = started + seconds, started + max_seconds
    ticker = _Ticker(label, seconds, result, progress)

    async def caller() -> None:
        while True:
            now = time.perf_counter()
            if (now >= stop_at and result.calls >= min_calls) or now >= hard_stop:
                return
            result.calls += 1  # counted at start so min_calls is not overshot by the callers
            begin = time.perf_counter()
            try:
                # Not `result.items += await ...`: that reads `items` before the await and
                # writes it back after, losing every other caller's updates meanwhile.
                done = await call(next(counter))
            except grpc.aio.AioRpcError as exc:
                result.errors[exc.code().name] += 1
            else:
                result.items += done
                result.latencies_s.append(time.perf_counter() - begin)

    async def tick() -> None:
        while True:
            ticker.update()
            await asyncio.sleep(0.5)

    ticking = asyncio.get_running_loop().create_task(tick())
    try:
        await asyncio.gather(*(caller() for _ in range(concurrency)))
    finally:
        ticking.cancel()
        ticker.close()
    result.seconds = time.perf_counter() - started
    return result


def timed_loop(
    step: Callable[[int], int],
    *,
    label: str,
    batch: int,
    seconds: float,
    min_iters: int = 3,
    warmup_iters: int = 2,
    progress: bool = True,
) -> LoadResult:
    """Call `step(i)` (returns items done) back to back for `seconds` and ≥ `min_iters`."""
    for i in range(warmup_iters):
        step(-1 - i)
    result = LoadResult(label, batch)
    started = time.perf_counter()
    ticker = _Ticker(label, seconds, result, progress)
    i = 0
    try:
        while time.perf_counter() - started < seconds or i < min_iters:
            begin = time.perf_counter()
            result.items += step(i)
            result.latencies_s.append(time.perf_counter() - begin)
            i += 1
            ticker.update()
    finally:
        ticker.close()
    result.calls = i
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------- gRPC
class RawClip:
    """ClipService methods on a channel that sends and receives bytes as they are.

    Requests are serialized by the caller and answers are not parsed, so the load
    generator spends as little CPU as possible beside the gateway on the same cores.
    """

    def __init__(self, channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]] = ()):
        self.metadata = tuple(metadata)
        self.embed_text = channel.unary_unary(SERVICE + "EmbedText")
        self.embed_image = channel.unary_unary(SERVICE + "EmbedImage")
        self.similarity = channel.unary_unary(SERVICE + "Similarity")
        self.classify = channel.unary_unary(SERVICE + "Classify")


def single_item_calls(
    client: RawClip,
    jpegs: Sequence[bytes],
    caption: Callable[[int], str],
    timeout_s: float = 120.0,
) -> dict[str, Callable[[int], Awaitable[int]]]:
    """`{"image": call, "text": call}`: one EmbedImage JPEG or one EmbedText caption a call.

    `call(i)` sends input `i`: the JPEG gets a comment holding `i` (`unique_jpeg`) and the
    caption is `caption(i)`, so every call is new to the cache and to single-flight.
    Answers come back packed (float32 bytes) and are not parsed.
    """
    from service.api.clip.v1 import clip_pb2

    packed = clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES

    async def image(i: int) -> int:
        jpeg = unique_jpeg(jpegs[i % len(jpegs)], i)
        request = clip_pb2.EmbedImageRequest(images=[jpeg], format=packed)
        await client.embed_image(request.SerializeToString(), timeout=timeout_s)
        return 1

    async def text(i: int) -> int:
        request = clip_pb2.EmbedTextRequest(texts=[caption(i)], format=packed)
        await client.embed_text(request.SerializeToString(), timeout=timeout_s)
        return 1

    return {"image": image, "text": text}


def channel_options() -> list[tuple[str, int]]:
    """64 MiB messages both ways, like the service's default limit."""
    size = 64 * 1024 * 1024
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident set size, peak resident set size) of `pid` in MB, from /proc."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = float(rest.split()[0]) / 1024.0
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def histogram_means(
    before: dict[str, float], after: dict[str, float], name: str
) -> dict[str, float]:
    """Mean of each labelled series of histogram `name` between two scrapes."""
    means: dict[str, float] = {}
    for key, total in after.items():
        if not key.startswith(name + "_sum{"):
            continue
        labels = key[len(name) + 4 :]
        count_key = f"{name}_count{labels}"
        d_count = after.get(count_key, 0.0) - before.get(count_key, 0.0)
        if d_count > 0:
            means[labels] = (total - before.get(key, 0.0)) / d_count
    return means


# ---------------------------------------------------------------------------- reports
def machine_info() -> list[tuple[str, str]]:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    gpu = "none"
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
            or "?"
        )
    return [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("cpu", f"{cpu}, {cores} cores usable"),
        ("gpu", gpu),
        ("load average at start (1, 5, 15 min)", load),
        ("python / torch", f"{platform.python_version()} / {torch.__version__}"),
        ("git commit", commit),
    ]


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float, digits: int = 1) -> str:
    """A number for a table: fixed digits, `–` for NaN."""
    if value != value:  # NaN
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def section(title: str) -> None:
    """A visible header in the console output."""
    print(f"\n=== {title} ===", flush=True)


def triton_batching(url: str, models: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(inference_count, execution_count) per model from Triton's statistics API."""
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(url)
    try:
        out: dict[str, tuple[int, int]] = {}
        for model in models:
            stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
            out[model] = (
                int(stats.get("inference_count", 0)),
                int(stats.get("execution_count", 0)),
            )
        return out
    finally:
        client.close()


def reexec_with_env(changes: dict[str, str], module: str) -> None:
    """Run this benchmark again with `changes` in the environment, unless already there.

    Threading variables such as OMP_WAIT_POLICY are read once, when torch's OpenMP
    runtime loads, so they cannot be changed inside a process that imported torch.
    """
    if all(os.environ.get(k) == v for k, v in changes.items()):
        return
    env = {**os.environ, **changes}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def threading_note(torch_threads: int) -> str:
    """How torch's threads were set up for a run (it changes the figures a lot)."""
    import torch

    threads = torch_threads or torch.get_num_threads()
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default: spin, then sleep)")
    return f"torch intra-op threads {threads}, OMP_WAIT_POLICY {policy}"


def repository_variant(repository: Path, torch_threads: int) -> Path:
    """`repository` with TORCH_THREADS set in both Triton configs (weights symlinked)."""
    if torch_threads <= 0:
        return repository
    target = repository.with_name(f"{repository.name}-t{torch_threads}")
    if (target / "metadata.json").is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    for path in sorted(repository.rglob("*")):
        dest = target / path.relative_to(repository)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        elif path.name == "config.pbtxt":
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = path.read_text().replace(
                'key: "TORCH_THREADS" value: { string_value: "0" }',
                f'key: "TORCH_THREADS" value: {{ string_value: "{torch_threads}" }}',
            )
            dest.write_text(text)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(path.resolve())
    return target


# Every benchmark runs with OMP_WAIT_POLICY=PASSIVE unless told otherwise: with libgomp's
# default (spin before sleeping) torch's idle OpenMP workers spin on the cores that the
# decode threads, the event loop, the load generator or a neighbour need, and a forward
# pass on 2 shared cores gets 10-200× slower (bench/README.md, "Threads"). The figures
# should measure the code, not that; `--omp-wait-policy inherit` measures it on purpose.
DEFAULT_OMP_WAIT_POLICY = "PASSIVE"


def add_threading_arguments(parser: argparse.ArgumentParser) -> None:
    """--torch-threads and --omp-wait-policy, the same for every benchmark."""
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="intra-op threads of the raw module, the embedded gateway and Triton (0 = torch's)",
    )
    parser.add_argument(
        "--omp-wait-policy",
        choices=("PASSIVE", "ACTIVE", "inherit"),
        default=DEFAULT_OMP_WAIT_POLICY,
        help="OMP_WAIT_POLICY of every process of the run; inherit = leave the environment "
        f"(default {DEFAULT_OMP_WAIT_POLICY})",
    )


def apply_threading(args: argparse.Namespace, module: str) -> None:
    """Re-run `module` with the asked OMP_WAIT_POLICY when the environment differs."""
    if args.omp_wait_policy != "inherit":
        reexec_with_env({"OMP_WAIT_POLICY": args.omp_wait_policy}, module)


# ---------------------------------------------------------------------------- entry points
def write_result(out: Path, text: str, summary: str, *extra_files: Path) -> None:
    """Write a benchmark's report to `out`, then print its summary and what was written.

    Every benchmark ends the same way: the Markdown file (its folder made when missing),
    a `=== summary ===` section holding `summary`, and one `wrote ...` line naming `out`
    and any `extra_files` written beside it (a chart).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    section("summary")
    print(summary)
    print("wrote " + " and ".join(str(p) for p in (out, *extra_files)), flush=True)


def interrupt_on_sigterm() -> None:
    """SIGTERM (`timeout`, a CI runner) raises KeyboardInterrupt, as Ctrl-C does.

    Python's default SIGTERM ends the process at once: the servers a benchmark started in
    their own sessions (tritonserver, gateways, redis-server) would outlive it. As an
    exception it unwinds the `with` blocks that stop them.
    """
    import signal

    def _interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)


def run_benchmark(
    argv: Sequence[str] | None,
    parse_args: Callable[[Sequence[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace], Coroutine[object, object, int]],
    module: str,
) -> int:
    """A benchmark's `main`: parse, re-run `module` with its threading environment, run."""
    args = parse_args(argv)
    apply_threading(args, module)
    interrupt_on_sigterm()
    return asyncio.run(run(args))
