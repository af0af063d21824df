"""Throughput and latency: the raw TorchScript module against the service, in one run.

    python -m bench.throughput --model clip-demo-shapes
    python -m bench.throughput --model ViT-B-32 --with-triton --quick
    python -m bench.throughput --model ViT-B-32 --device cuda      # on a GPU machine

Measures, on the same machine in the same run:
- the raw module (no gRPC, no decoding: pre-decoded uint8 pixels, pre-made token ids)
  at batch 1/8/32: images; texts padded to 77 tokens; texts padded only to the longest
  real length in the batch;
- the service (an embedded gateway in its own process, and with `--with-triton` a
  gateway in front of a real tritonserver) at concurrency 1/8/32: every call is one
  image or one text, every input is distinct, caching is off;
- p50/p99 latency per call (per batch for the raw module), the batching gain (32
  concurrent callers ÷ sequential calls) and service ÷ raw ratios against the targets.

Writes bench/results/throughput-<model>[-<device>].md and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from bench.common import (
    CAPTION_MIX,
    RESULTS_DIR,
    LoadResult,
    RawClip,
    add_threading_arguments,
    channel_options,
    closed_loop,
    fmt,
    machine_info,
    md_table,
    mixed_caption,
    model_repository,
    photo_pool,
    repository_variant,
    run_benchmark,
    section,
    short_caption,
    threading_note,
    timed_loop,
    triton_batching,
    unique_jpeg,
    write_result,
)
from service.api.clip.v1 import clip_pb2
from service.core.image_preprocess import ImageLimits, ImageSpec, preprocess_image_bytes
from service.core.text_tokenize import TextTokenizer, Tokens
from service.model.metadata import ModelMetadata
from service.processes.gateway import GatewayProcess
from service.processes.metric_samples import scrape

# The targets of the issues, defined for ViT-B-32 with 32 concurrent single-item callers.
TEXT_TARGET = 4.0  # short captions through the service ÷ 77-padded raw module at batch 32
IMAGE_TARGET = 0.90  # single images through the service ÷ raw module at batch 32
IMAGES = "images"
TEXT_77 = "texts, 77-padded"
SHORT_REAL = "short captions, real length"
MIX_REAL = "caption mix, real length"
SHORT = "short captions"
MIX = "caption mix"
PHOTO_SIZE = (640, 480)
POOL = 64
PACKED = clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES
#: Reads (items, batches) so far per modality; their change over a point is its mean batch.
Batching = Callable[[], dict[str, tuple[float, float]]]


@dataclass
class Point:
    """One measured point of one path."""

    path: str  # raw, embedded, triton
    inputs: str
    x: int  # batch size (raw) or concurrency (service)
    result: LoadResult
    mean_batch: float = float("nan")


# ---------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """Everything both the raw module and the service are fed, made once."""

    jpegs: list[bytes]
    pixels: np.ndarray  # the same JPEGs decoded as the gateway would: uint8 [POOL,3,S,S]
    short_tokens: list[Tokens]
    mix_tokens: list[Tokens]
    image_note: str


def make_inputs(metadata: ModelMetadata, image_size: str, tokenizer: TextTokenizer) -> Inputs:
    """Photos (JPEG) and captions (ids), the pixels decoded with the service's own code."""
    size = metadata.image_size
    dims = PHOTO_SIZE if image_size == "photo" else (size, size)
    jpegs = photo_pool(POOL, dims)
    spec = ImageSpec(size, metadata.interpolation)
    limits = ImageLimits(20 * 1024 * 1024, 50_000_000, True)
    pixels = np.stack([preprocess_image_bytes(j, spec, limits) for j in jpegs])
    kib = np.mean([len(j) for j in jpegs]) / 1024
    note = (
        f"{dims[0]}×{dims[1]} JPEG photos (quality 90, mean {kib:.0f} KiB), decoded and "
        f"resized to {size}×{size} by the gateway; the raw module gets them pre-decoded"
    )
    return Inputs(
        jpegs=jpegs,
        pixels=pixels,
        short_tokens=[tokenizer.tokenize(short_caption(i)) for i in range(1024)],
        mix_tokens=[tokenizer.tokenize(mixed_caption(i)) for i in range(1024)],
        image_note=note,
    )


# ---------------------------------------------------------------------------- raw module
class RawModule:
    """The exported TorchScript encoders, called directly on one device."""

    def __init__(self, repository: Path, metadata: ModelMetadata, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.image = torch.jit.load(
            str(repository / metadata.image_model / "1" / "model.pt"), map_location=self.device
        ).eval()
        self.text = torch.jit.load(
            str(repository / metadata.text_model / "1" / "model.pt"), map_location=self.device
        ).eval()

    def run(self, module_name: str, batch: np.ndarray) -> int:
        """One forward pass; host → device and back included, as the service does it."""
        module = self.image if module_name == "image" else self.text
        with self.torch.inference_mode():
            out = module(self.torch.from_numpy(batch).to(self.device))
            out.to("cpu").numpy()  # waits for the device, like the service's copy back
        return len(batch)


def pad_batch(tokens: Sequence[Tokens], length: int | None) -> np.ndarray:
    """Pad to `length`, or to the longest text in the batch when None."""
    longest = max(len(t.ids) for t in tokens)
    return TextTokenizer.pad(tokens, length or longest)


def measure_raw(
    raw: RawModule,
    inputs: Inputs,
    batches: Sequence[int],
    args: argparse.Namespace,
    which: Sequence[str] = (IMAGES, TEXT_77, SHORT_REAL, MIX_REAL),
) -> list[Point]:
    """The raw module at each batch size, for each kind of input."""
    points: list[Point] = []
    for kind in which:
        for batch in batches:
            if kind == IMAGES:
                pool = inputs.pixels

                def step(i: int, batch: int = batch, pool: np.ndarray = pool) -> int:
                    rows = np.take(pool, range(i * batch, (i + 1) * batch), axis=0, mode="wrap")
                    return raw.run("image", rows)
            else:
                tokens = inputs.mix_tokens if kind == MIX_REAL else inputs.short_tokens
                length = 77 if kind == TEXT_77 else None

                def step(
                    i: int,
                    batch: int = batch,
                    tokens: list[Tokens] = tokens,
                    length: int | None = length,
                ) -> int:
                    start = (i * batch) % len(tokens)
                    chunk = [tokens[(start + k) % len(tokens)] for k in range(batch)]
                    return raw.run("text", pad_batch(chunk, length))

            result = timed_loop(
                step,
                label=f"raw {kind} b{batch}",
                batch=batch,
                seconds=args.seconds,
                min_iters=args.min_iters,
                warmup_iters=2,
            )
            points.append(Point("raw", kind, batch, result))
            print(
                f"  raw   {kind:<30} batch {batch:>2}: {fmt(result.items_per_s):>8} items/s, "
                f"p50 {fmt(result.percentile_ms(50))} ms/batch",
                flush=True,
            )
    return points


# ---------------------------------------------------------------------------- service
def service_calls(client: RawClip, inputs: Inputs) -> dict[str, Callable[[int], Awaitable[int]]]:
    """One single-item call per kind of input; `i` makes each input distinct."""

    async def image(i: int) -> int:
        jpeg = unique_jpeg(inputs.jpegs[i % len(inputs.jpegs)], i)
        request = clip_pb2.EmbedImageRequest(images=[jpeg], format=PACKED)
        await client.embed_image(request.SerializeToString(), timeout=600)
        return 1

    def text_call(make: Callable[[int], str]) -> Callable[[int], Awaitable[int]]:
        async def call(i: int) -> int:
            request = clip_pb2.EmbedTextRequest(texts=[make(i)], format=PACKED)
            await client.embed_text(request.SerializeToString(), timeout=600)
            return 1

        return call

    return {IMAGES: image, SHORT: text_call(short_caption), MIX: text_call(mixed_caption)}


async def measure_service(
    path: str,
    target: str,
    inputs: Inputs,
    concurrencies: Sequence[int],
    args: argparse.Namespace,
    batching: Batching,
    kinds: Sequence[str] = (IMAGES, SHORT, MIX),
) -> list[Point]:
    """The gateway at `target` at each concurrency, for each kind of input.

    `batching()` returns (items, forward passes) so far per modality: their change over
    a point is its mean batch size.
    """
    points: list[Point] = []
    counter = itertools.count(10_000_000)  # distinct inputs across the whole run
    async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
        calls = service_calls(RawClip(channel), inputs)
        for kind, call in ((k, calls[k]) for k in kinds):
            modality = "image" if kind == IMAGES else "text"
            for concurrency in concurrencies:
                marks: dict[str, tuple[float, float]] = {}

                def mark(marks: dict[str, tuple[float, float]] = marks) -> None:
                    marks.update(batching())

                result = await closed_loop(
                    call,
                    label=f"{path} {kind} c{concurrency}",
                    concurrency=concurrency,
                    seconds=args.seconds,
                    min_calls=args.min_rounds * concurrency,
                    counter=counter,
                    before_measure=mark,
                )
                after = batching()
                items = after[modality][0] - marks.get(modality, (0.0, 0.0))[0]
                passes = after[modality][1] - marks.get(modality, (0.0, 0.0))[1]
                point = Point(
                    path, kind, concurrency, result, items / passes if passes else float("nan")
                )
                points.append(point)
                print(
                    f"  {path:<8} {kind:<20} conc {concurrency:>2}: "
                    f"{fmt(result.items_per_s):>8} items/s, "
                    f"p50 {fmt(result.percentile_ms(50))} ms, "
                    f"p99 {fmt(result.percentile_ms(99))} ms, "
                    f"mean batch {fmt(point.mean_batch)}, errors {result.error_text}",
                    flush=True,
                )
    return points


def embedded_batching(metrics_port: int) -> Batching:
    """(items, batches) per modality from the gateway's clip_batch_size histogram."""

    def read() -> dict[str, tuple[float, float]]:
        samples = scrape(metrics_port)
        return {
            m: (
                samples.get(f'clip_batch_size_sum{{modality="{m}"}}', 0.0),
                samples.get(f'clip_batch_size_count{{modality="{m}"}}', 0.0),
            )
            for m in ("image", "text")
        }

    return read


def triton_batching_reader(url: str, metadata: ModelMetadata) -> Batching:
    """(inferences, executions) per modality from Triton's statistics."""

    def read() -> dict[str, tuple[float, float]]:
        stats = triton_batching(url, [metadata.image_model, metadata.text_model])
        image, text = stats[metadata.image_model], stats[metadata.text_model]
        return {
            "image": (float(image[0]), float(image[1])),
            "text": (float(text[0]), float(text[1])),
        }

    return read


# ---------------------------------------------------------------------------- paired rounds
@dataclass
class PairedRound:
    """Each service path at the top concurrency between two raw measurements at the top batch."""

    #: raw items/s measured before the first path, then after each path.
    raw: list[float]
    service: dict[str, float]

    def ratios(self) -> dict[str, float]:
        """Each path ÷ the mean of the raw measurements just before and just after it."""
        return {
            path: value / ((self.raw[i] + self.raw[i + 1]) / 2)
            for i, (path, value) in enumerate(self.service.items())
        }


@contextlib.asynccontextmanager
async def service_path(
    path: str,
    repository: Path,
    metadata: ModelMetadata,
    args: argparse.Namespace,
    gateway_settings: dict[str, object],
) -> AsyncIterator[tuple[str, Batching]]:
    """A running gateway for `path` (embedded, or triton with its tritonserver).

    Yields its gRPC target and the reader of its (items, batches) counters.
    """
    if path == "embedded":
        with GatewayProcess(
            repository, log_name="embedded", backend="embedded", device=args.device,
            **gateway_settings,
        ) as gateway:  # fmt: skip
            yield gateway.target, embedded_batching(gateway.metrics_port)
        return
    from service.processes.triton_server import TritonProcess

    with tempfile.TemporaryDirectory(prefix="bench-triton-") as workdir:
        triton_repository = repository_variant(repository, args.torch_threads)
        triton = TritonProcess(triton_repository, workdir=Path(workdir), startup_timeout_s=300)
        try:
            await asyncio.to_thread(triton.start)
            with GatewayProcess(
                repository, log_name="triton-gateway", backend="triton",
                triton_url=triton.grpc_url, **gateway_settings,
            ) as gateway:  # fmt: skip
                yield gateway.target, triton_batching_reader(triton.grpc_url, metadata)
        finally:
            await asyncio.to_thread(triton.close)


async def paired_image_rounds(
    raw: RawModule,
    inputs: Inputs,
    repository: Path,
    metadata: ModelMetadata,
    args: argparse.Namespace,
    gateway_settings: dict[str, object],
) -> list[PairedRound]:
    """The image target as N rounds of raw → service → raw → ..., each ratio within its round.

    A sweep measures the service minutes after the raw module, and the machine drifts
    meanwhile; here each service point sits between two raw points seconds away, and
    the median of the rounds is what to read.
    """
    rounds: list[PairedRound] = []
    async with contextlib.AsyncExitStack() as stack:
        readers = {
            path: await stack.enter_async_context(
                service_path(path, repository, metadata, args, gateway_settings)
            )
            for path in ("embedded", *(["triton"] if args.with_triton else []))
        }
        for n in range(args.paired_rounds):
            print(f"  round {n + 1} of {args.paired_rounds}", flush=True)
            this = PairedRound([_raw_images(raw, inputs, args)], {})
            for path, (target, reader) in readers.items():
                point = (
                    await measure_service(
                        path, target, inputs, [args.top], args, reader, kinds=(IMAGES,)
                    )
                )[0]
                this.service[path] = point.result.items_per_s
                this.raw.append(_raw_images(raw, inputs, args))
            rounds.append(this)
            print(
                "    ratios: " + ", ".join(f"{p} {v:.2f}×" for p, v in this.ratios().items()),
                flush=True,
            )
    return rounds


def _raw_images(raw: RawModule, inputs: Inputs, args: argparse.Namespace) -> float:
    return measure_raw(raw, inputs, [args.top], args, which=(IMAGES,))[0].result.items_per_s


def paired_ratios(rounds: Sequence[PairedRound], top: int) -> list[Ratio]:
    """Median over the rounds of service ÷ raw images, against the image target."""
    if not rounds:
        return []
    return [
        Ratio(
            f"{path}: images c{top} ÷ raw images b{top}, median of {len(rounds)} paired rounds",
            float(np.median([r.ratios()[path] for r in rounds])),
            IMAGE_TARGET,
        )
        for path in rounds[0].service
    ]


def paired_rows(rounds: Sequence[PairedRound]) -> list[list[str]]:
    """One table row per round: the raw items/s in order, then items/s and ratio per path."""
    return [
        [str(n + 1), " → ".join(fmt(v) for v in r.raw)]
        + [f"{fmt(r.service[p])} ({ratio:.2f}×)" for p, ratio in r.ratios().items()]
        for n, r in enumerate(rounds)
    ]


# ---------------------------------------------------------------------------- report
def find(points: Sequence[Point], path: str, inputs: str, x: int) -> Point | None:
    """The point of `path`/`inputs` at `x`, if it was measured."""
    for p in points:
        if (p.path, p.inputs, p.x) == (path, inputs, x):
            return p
    return None


@dataclass
class Ratio:
    """One ratio line of the report."""

    name: str
    value: float
    target: float | None = None

    @property
    def verdict(self) -> str:
        """PASS / MISS against the target, or `info`."""
        if self.target is None:
            return "info"
        return "PASS" if self.value >= self.target else "MISS"


def ratios(points: Sequence[Point], baselines: dict[str, float], top: int) -> list[Ratio]:
    """Service ÷ raw and batching-gain ratios from the measured points."""
    out: list[Ratio] = []
    for path in ("embedded", "triton"):

        def rate(kind: str, x: int, path: str = path) -> float:
            p = find(points, path, kind, x)
            return p.result.items_per_s if p else float("nan")

        if find(points, path, IMAGES, top) is None:
            continue
        out += [
            Ratio(
                f"{path}: images c{top} ÷ raw images b{top}",
                rate(IMAGES, top) / baselines[IMAGES],
                IMAGE_TARGET,
            ),
            Ratio(
                f"{path}: short captions c{top} ÷ raw 77-padded b{top}",
                rate(SHORT, top) / baselines[TEXT_77],
                TEXT_TARGET,
            ),
            Ratio(
                f"{path}: short captions c{top} ÷ raw short real-length b{top}",
                rate(SHORT, top) / baselines[SHORT_REAL],
            ),
            Ratio(
                f"{path}: caption mix c{top} ÷ raw 77-padded b{top}",
                rate(MIX, top) / baselines[TEXT_77],
            ),
            Ratio(
                f"{path}: caption mix c{top} ÷ raw mix real-length b{top}",
                rate(MIX, top) / baselines[MIX_REAL],
            ),
        ]
        for kind in (IMAGES, SHORT, MIX):
            out.append(
                Ratio(f"{path}: batching gain, {kind} c{top} ÷ c1", rate(kind, top) / rate(kind, 1))
            )
    return out


def baseline_rows(
    points: Sequence[Point], rechecks: Sequence[Point], baselines: dict[str, float], top: int
) -> list[list[str]]:
    """First and repeated raw batch-`top` rate of each input, and the baseline used."""
    rows = []
    for kind, baseline in baselines.items():
        first = find(points, "raw", kind, top)
        again = find(rechecks, "raw", kind, top)
        if first is None:
            continue
        first_rate = first.result.items_per_s
        again_rate = again.result.items_per_s if again else float("nan")
        drift = f"{100 * (again_rate / first_rate - 1):+.0f} %" if again else "–"
        rows.append([kind, fmt(first_rate), fmt(again_rate), drift, fmt(baseline)])
    return rows


def write_report(
    args: argparse.Namespace,
    points: Sequence[Point],
    rechecks: Sequence[Point],
    rounds: Sequence[PairedRound],
    baselines: dict[str, float],
    ratio_lines: Sequence[Ratio],
    inputs: Inputs,
    info: list[tuple[str, str]],
    tokenizer: TextTokenizer,
    out_md: Path,
) -> str:
    """The Markdown report; `out_md` names the chart beside it."""
    lengths = [len(t.ids) for t in inputs.mix_tokens]
    short_lengths = [len(t.ids) for t in inputs.short_tokens]
    buckets: dict[int, int] = {}
    for n in lengths:
        edge = tokenizer.bucket_length(n)
        buckets[edge] = buckets.get(edge, 0) + 1
    mix_note = ", ".join(f"{name} {share} %" for name, _, share in CAPTION_MIX)
    parts = [
        f"# Throughput: {args.model} on {args.device}",
        "",
        md_table(["", ""], info),
        "",
        f"- Images: {inputs.image_note}.",
        f"- Short captions: {min(short_lengths)}–{max(short_lengths)} tokens with start and end "
        f"(mean {np.mean(short_lengths):.1f}).",
        f"- Caption mix: {mix_note}; {min(lengths)}–{max(lengths)} tokens (mean "
        f"{np.mean(lengths):.1f}); by gateway length bucket: "
        + ", ".join(f"≤{k}: {100 * v / len(lengths):.0f} %" for k, v in sorted(buckets.items()))
        + ".",
        "- Service: every call carries one item, every input is distinct (a JPEG comment or "
        "another caption), the LRU is off (`local_cache_items=0`) and there is no Redis, so "
        "nothing is served from a cache or single-flight dedup. The gateway runs in its own "
        "process; the load generator sends pre-serialized bytes and does not parse answers.",
        f"- Each point: ≥ {args.seconds:g} s and ≥ {args.min_rounds} round(s) of calls after "
        "one unmeasured warm-up round; raw module: ≥ "
        f"{args.seconds:g} s and ≥ {args.min_iters} batches after 2 warm-up batches. Latency "
        "is per call (service) or per batch (raw). `mean batch` is items per forward pass "
        "during the point (gateway metrics, or Triton's statistics).",
        "",
        "## Points",
        "",
        md_table(
            [
                "path",
                "input",
                "batch / concurrency",
                "items/s",
                "p50 ms",
                "p99 ms",
                "mean batch",
                "errors",
            ],
            [
                [
                    p.path,
                    p.inputs,
                    p.x,
                    fmt(p.result.items_per_s),
                    fmt(p.result.percentile_ms(50)),
                    fmt(p.result.percentile_ms(99)),
                    fmt(p.mean_batch),
                    p.result.error_text,
                ]
                for p in points
            ],
        ),
        "",
        "## Baselines for the ratios",
        "",
        "The raw batch-32 points were measured again after the service points; the ratios use "
        "the mean of both, and the drift says how much the machine changed meanwhile "
        "(`--quick` skips the second measurement: the baselines are the first).",
        "",
        md_table(
            ["raw input", "first items/s", "again items/s", "drift", "baseline items/s"],
            baseline_rows(points, rechecks, baselines, args.top),
        ),
        "",
        *(
            [
                "## Paired rounds (images)",
                "",
                f"Each round measures the raw module at batch {args.top}, then each service "
                f"path at {args.top} callers followed by the raw module again; a path's ratio "
                "uses the mean of the raw points just before and after it, and the image "
                "verdicts below with `median` use the median round.",
                "",
                md_table(
                    [
                        "round",
                        "raw items/s, in order",
                        *(f"{p} items/s (÷ raw)" for p in rounds[0].service),
                    ],
                    paired_rows(rounds),
                ),
                "",
            ]
            if rounds
            else []
        ),
        "## Ratios",
        "",
        md_table(
            ["ratio", "value", "target", "verdict"],
            [
                [r.name, f"{r.value:.2f}×", f"≥ {r.target:g}×" if r.target else "", r.verdict]
                for r in ratio_lines
            ],
        ),
        "",
        f"Targets (from the issues) are defined for ViT-B-32 with {args.top} concurrent "
        "single-item callers; for other models the verdicts are informative.",
        "",
        f"![throughput and p99 latency]({out_md.with_suffix('.png').name})",
        "",
    ]
    return "\n".join(parts)


def plot(points: Sequence[Point], title: str, out_png: Path) -> None:
    """Throughput and p99 latency against concurrency (batch for raw), one line per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    groups = {
        "images": [("raw", IMAGES), ("embedded", IMAGES), ("triton", IMAGES)],
        "texts": [
            ("raw", TEXT_77), ("raw", SHORT_REAL), ("raw", MIX_REAL),
            ("embedded", SHORT), ("embedded", MIX), ("triton", SHORT), ("triton", MIX),
        ],
    }  # fmt: skip
    styles = {"raw": "--", "embedded": "-", "triton": ":"}
    for row, (modality, lines) in enumerate(groups.items()):
        for path, kind in lines:
            series = sorted(
                (p for p in points if p.path == path and p.inputs == kind), key=lambda p: p.x
            )
            if not series:
                continue
            xs = [p.x for p in series]
            label = f"{path}: {kind}" + (" (x = batch)" if path == "raw" else "")
            axes[row][0].plot(
                xs, [p.result.items_per_s for p in series], styles[path], marker="o", label=label
            )
            axes[row][1].plot(
                xs,
                [p.result.percentile_ms(99) for p in series],
                styles[path],
                marker="o",
                label=label,
            )
        axes[row][0].set_ylabel(f"{modality}/s")
        axes[row][1].set_ylabel("p99 latency, ms (raw: per batch)")
        axes[row][0].set_yscale("log")
        axes[row][1].set_yscale("log")
        for ax in axes[row]:
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 8, 32], ["1", "8", "32"])
            ax.set_xlabel("concurrent single-item callers (raw module: batch size)")
            ax.grid(True, alpha=0.3)
        axes[row][0].legend(fontsize=7)
        axes[row][0].set_title(f"{modality}: throughput")
        axes[row][1].set_title(f"{modality}: p99 latency")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="clip-demo-shapes", choices=("clip-demo-shapes", "ViT-B-32")
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="checkpoint or 'none' (default: demo weights if present, else none)",
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds per point (default 5, --quick 2)"
    )
    parser.add_argument(
        "--with-triton", action="store_true", help="also a gateway in front of a real tritonserver"
    )
    parser.add_argument("--quick", action="store_true", help="shorter points, one measured round")
    parser.add_argument(
        "--device", default="cpu", help="torch device of the raw module and the embedded gateway"
    )
    parser.add_argument(
        "--image-size",
        choices=("photo", "model"),
        default="photo",
        help="640×480 photos, or JPEGs already at the model's size",
    )
    parser.add_argument(
        "--concurrency",
        default="1,8,32",
        help="service concurrencies (the last one is the ratios' point)",
    )
    parser.add_argument(
        "--batches",
        default="1,8,32",
        help="raw module batch sizes (must include the last concurrency)",
    )
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=0,
        help="afterwards, N rounds of raw images → service images, each ratio within its round",
    )
    parser.add_argument("--tag", default="", help="suffix for the result file names")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--no-embedded", action="store_true", help="skip the embedded gateway (e.g. only Triton)"
    )
    add_threading_arguments(parser)
    args = parser.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 5.0)
    args.min_iters = 2 if args.quick else 3
    args.min_rounds = 1 if args.quick else 2
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.batch_sizes = [int(b) for b in args.batches.split(",")]
    args.top = args.concurrencies[-1]
    if args.top not in args.batch_sizes or 1 not in args.concurrencies:
        parser.error(
            "--batches must include the last concurrency, and --concurrency must include 1"
        )
    return args


async def run(args: argparse.Namespace) -> int:
    section(f"throughput: {args.model} on {args.device}")
    info = machine_info()
    info.append(("threads", threading_note(args.torch_threads)))
    for key, value in info:
        print(f"  {key}: {value}")
    repository = model_repository(args.model, args.pretrained)
    metadata = ModelMetadata.load(repository)
    tokenizer = TextTokenizer(metadata.context_length, (8, 16, 24, 32, 48, 77))
    inputs = make_inputs(metadata, args.image_size, tokenizer)
    print(f"  model repository: {repository}\n  images: {inputs.image_note}")

    section("raw module")
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
    raw = RawModule(repository, metadata, args.device)
    points = measure_raw(raw, inputs, args.batch_sizes, args)

    gateway_settings: dict[str, object] = {
        "local_cache_items": 0,
        "redis_url": "",
        "torch_threads": args.torch_threads,
    }
    wanted = {
        "embedded": ("embedded gateway", not args.no_embedded),
        "triton": ("gateway + tritonserver", args.with_triton),
    }
    for path in (p for p, (_, on) in wanted.items() if on):
        section(f"service: {wanted[path][0]}")
        if path == "triton" and args.device != "cpu":
            print("  note: the pip tritonserver runs the python backend on the CPU only")
        async with service_path(path, repository, metadata, args, gateway_settings) as (
            target,
            batching,
        ):
            points += await measure_service(
                path, target, inputs, args.concurrencies, args, batching
            )

    rechecks: list[Point] = []
    if not args.quick:  # --quick trusts the first raw points: one pass saves ~1 min on ViT
        section("raw module again (drift check of the ratio baselines)")
        rechecks = measure_raw(raw, inputs, [args.top], args)
    rounds: list[PairedRound] = []
    if args.paired_rounds > 0:
        section(f"paired rounds: images, raw b{args.top} then service c{args.top}")
        rounds = await paired_image_rounds(
            raw, inputs, repository, metadata, args, gateway_settings
        )
    del raw
    gc.collect()
    baselines: dict[str, float] = {}
    for kind in (IMAGES, TEXT_77, SHORT_REAL, MIX_REAL):
        first, again = find(points, "raw", kind, args.top), find(rechecks, "raw", kind, args.top)
        values = [p.result.items_per_s for p in (first, again) if p is not None]
        baselines[kind] = float(np.mean(values)) if values else float("nan")

    ratio_lines = ratios(points, baselines, args.top) + paired_ratios(rounds, args.top)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"-{args.device.replace(':', '')}"
    suffix += f"-{args.tag}" if args.tag else ""
    out_md = args.results_dir / f"throughput-{args.model}{suffix}.md"
    text = write_report(
        args, points, rechecks, rounds, baselines, ratio_lines, inputs, info, tokenizer, out_md
    )
    plot(
        points,
        f"{args.model} on {args.device}: throughput and p99 latency",
        out_md.with_suffix(".png"),
    )

    verdicts = [
        f"{r.verdict}: {r.name} = {r.value:.2f}× (target ≥ {r.target:g}×)"
        for r in ratio_lines
        if r.target is not None
    ]
    summary = "\n".join([text.split("## Points", 1)[1], *verdicts])
    write_result(out_md, text, summary, out_md.with_suffix(".png"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(argv, parse_args, run, "bench.throughput")


if __name__ == "__main__":
    sys.exit(main())
