"""Throughput and latency: the raw TorchScript module against the service, in one run.

    python -m bench.throughput --model clip-demo-shapes
    python -m bench.throughput --model ViT-B-32 --with-triton --quick
    python -m bench.throughput --model ViT-B-32 --device cuda      # on a GPU machine

What it measures and how: bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import harness as h
from bench.captions import CAPTION_MIX, mixed_caption, short_caption
from service.core.text_tokenize import TextTokenizer
from service.model.metadata import ModelMetadata
from service.processes.metric_samples import scrape

# The targets of the issues, defined for ViT-B-32 with 32 concurrent single-item callers.
TEXT_TARGET = 4.0  # short captions through the service ÷ 77-padded raw module at batch 32
IMAGE_TARGET = 0.90  # single images through the service ÷ raw module at batch 32
IMAGES, TEXT_77 = "images", "texts, 77-padded"
SHORT_REAL, MIX_REAL = "short captions, real length", "caption mix, real length"
SHORT, MIX = "short captions", "caption mix"
RAW_KINDS, SERVICE_KINDS = (IMAGES, TEXT_77, SHORT_REAL, MIX_REAL), (IMAGES, SHORT, MIX)
POOL = 64
#: Service ÷ raw ratios at the top point: (name, service input, raw name, raw input, target).
SERVICE_RATIOS = (
    ("images", IMAGES, "images", IMAGES, IMAGE_TARGET),
    ("short captions", SHORT, "77-padded", TEXT_77, TEXT_TARGET),
    ("short captions", SHORT, "short real-length", SHORT_REAL, None),
    ("caption mix", MIX, "77-padded", TEXT_77, None),
    ("caption mix", MIX, "mix real-length", MIX_REAL, None),
)
BASELINE_HEADERS = ["raw input", "first items/s", "again items/s", "drift", "baseline items/s"]
POINT_HEADERS = [
    "path", "input", "batch / concurrency", "items/s", "p50 ms", "p99 ms", "mean batch", "errors",
]  # fmt: skip


@dataclass
class Point:
    """One measured point of one path."""

    path: str  # raw, embedded, triton
    inputs: str
    x: int  # batch size (raw) or concurrency (service)
    result: h.LoadResult
    mean_batch: float = float("nan")

    def row(self) -> list[object]:
        r = self.result
        figures = (r.items_per_s, r.percentile_ms(50), r.percentile_ms(99), self.mean_batch)
        return [self.path, self.inputs, self.x, *map(h.fmt, figures), r.error_text]


class Raw:
    """The exported TorchScript encoders on one device, fed what the gateway would feed."""

    def __init__(self, repository: Path, metadata: ModelMetadata, args: argparse.Namespace) -> None:
        import torch

        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        self.torch, self.device, self.args = torch, torch.device(args.device), args
        model = lambda name: str(repository / name / "1" / "model.pt")  # noqa: E731
        self.modules = {
            m: torch.jit.load(model(name), map_location=self.device).eval()
            for m, name in (("image", metadata.image_model), ("text", metadata.text_model))
        }
        self.tokenizer = TextTokenizer(metadata.context_length, (8, 16, 24, 32, 48, 77))
        size = metadata.image_size
        dims = h.PHOTO if args.image_size == "photo" else (size, size)
        self.jpegs = h.photo_pool(POOL, dims)
        self.pixels = h.decoded(self.jpegs, metadata)
        self.tokens = {
            kind: [self.tokenizer.tokenize(caption(i)) for i in range(1024)]
            for kind, caption in ((SHORT_REAL, short_caption), (MIX_REAL, mixed_caption))
        }
        self.image_note = (
            f"{h.photo_note(self.jpegs, dims)}, quality 90, decoded and resized to {size}×{size} "
            "by the gateway; the raw module gets them pre-decoded"
        )

    def step(self, kind: str, batch: int) -> Callable[[int], int]:
        """Batch `i` of `kind` through one forward pass (host → device and back, as the
        service does it): pixels, or token ids padded to 77 or to the batch's longest."""
        tokens = self.tokens[MIX_REAL if kind == MIX_REAL else SHORT_REAL]

        def run(i: int) -> int:
            if kind == IMAGES:
                rows = range(i * batch, (i + 1) * batch)
                modality, rows = "image", np.take(self.pixels, rows, axis=0, mode="wrap")
            else:
                chunk = [tokens[(i * batch + k) % len(tokens)] for k in range(batch)]
                longest = 77 if kind == TEXT_77 else max(len(t.ids) for t in chunk)
                modality, rows = "text", TextTokenizer.pad(chunk, longest)
            with self.torch.inference_mode():
                self.modules[modality](self.torch.from_numpy(rows).to(self.device)).cpu().numpy()
            return batch

        return run

    async def measure(self, batches: list[int], kinds: tuple[str, ...] = RAW_KINDS) -> list[Point]:
        """The raw module at each batch size, for each kind of input."""
        points = []
        for kind, batch in itertools.product(kinds, batches):
            result = await h.timed_loop(
                self.step(kind, batch), label=f"raw {kind} b{batch}", seconds=self.args.seconds,
                min_iters=self.args.min_iters,
            )  # fmt: skip
            points.append(Point("raw", kind, batch, result))
            print(f"  {' | '.join(map(str, points[-1].row()))}", flush=True)
        return points


@contextlib.asynccontextmanager
async def service(
    path: str, repository: Path, metadata: ModelMetadata, args: argparse.Namespace
) -> AsyncIterator:
    """A running gateway for `path` (embedded, or triton with its tritonserver), cache off.

    Yields its gRPC target and a reader of (items, forward passes) so far per modality.
    """
    settings = {"local_cache_items": 0, "redis_url": "", "torch_threads": args.torch_threads}
    with contextlib.ExitStack() as stack:
        if path == "embedded":
            gw = stack.enter_context(
                h.gateway(repository, "embedded", device=args.device, **settings)
            )

            def read() -> dict[str, tuple[float, float]]:
                s, hist = scrape(gw.metrics_port), 'clip_batch_size_{}{{modality="{}"}}'
                return {
                    m: (s.get(hist.format("sum", m), 0.0), s.get(hist.format("count", m), 0.0))
                    for m in ("image", "text")
                }
        else:
            triton = stack.enter_context(h.triton(repository, torch_threads=args.torch_threads))
            settings |= {"backend": "triton", "triton_url": triton.grpc_url}
            gw = stack.enter_context(h.gateway(repository, "triton-gateway", **settings))

            def read() -> dict[str, tuple[float, float]]:
                stats = h.triton_stats(triton.grpc_url, [metadata.image_model, metadata.text_model])
                return {"image": stats[metadata.image_model], "text": stats[metadata.text_model]}

        yield gw.target, read


async def measure_service(
    path: str, gateway: tuple[str, Callable], raw: Raw, concurrencies: list[int],
    kinds: tuple[str, ...] = SERVICE_KINDS,
) -> list[Point]:  # fmt: skip
    """The gateway (target, reader) at each concurrency, for each kind of input; the mean
    batch of a point is the change of (items, forward passes) over it."""
    (target, read), points = gateway, []
    counter = itertools.count(10_000_000)  # distinct inputs across the whole run
    async with h.channel(target) as channel:
        client = h.RawClip(channel)
        calls = {
            IMAGES: h.grpc_calls(client, raw.jpegs)["image"],
            SHORT: h.grpc_calls(client, [], short_caption)["text"],
            MIX: h.grpc_calls(client, [], mixed_caption)["text"],
        }
        for kind, concurrency in itertools.product(kinds, concurrencies):
            modality, marks = "image" if kind == IMAGES else "text", {}
            result = await h.closed_loop(
                calls[kind], label=f"{path} {kind} c{concurrency}", concurrency=concurrency,
                seconds=raw.args.seconds, min_calls=raw.args.min_rounds * concurrency,
                counter=counter, before_measure=lambda m=marks: m.update(read()),
            )  # fmt: skip
            (i0, b0), (i1, b1) = marks[modality], read()[modality]
            mean_batch = (i1 - i0) / (b1 - b0) if b1 > b0 else float("nan")
            points.append(Point(path, kind, concurrency, result, mean_batch))
            print(f"  {' | '.join(map(str, points[-1].row()))}", flush=True)
    return points


async def paired_rounds(
    raw: Raw, repository: Path, metadata: ModelMetadata, args: argparse.Namespace
) -> list[tuple[list[float], dict[str, float]]]:
    """The image target as rounds of raw → service → raw → ...: each path's ratio uses the raw
    points just before and after it, seconds away instead of minutes (the machine drifts)."""
    rounds, rate = [], lambda points: points[0].result.items_per_s

    async with contextlib.AsyncExitStack() as stack:
        paths = {
            p: await stack.enter_async_context(service(p, repository, metadata, args))
            for p in args.paths
        }
        for n in range(args.paired_rounds):
            print(f"  round {n + 1} of {args.paired_rounds}", flush=True)
            raws, served = [rate(await raw.measure([args.top], (IMAGES,)))], {}
            for path, gateway in paths.items():
                points = await measure_service(path, gateway, raw, [args.top], (IMAGES,))
                served[path] = rate(points)
                raws.append(rate(await raw.measure([args.top], (IMAGES,))))
            rounds.append((raws, served))
    return rounds


def round_ratios(raws: list[float], served: dict[str, float]) -> dict[str, float]:
    """Each path ÷ the mean of the raw measurements just before and just after it."""
    return {p: v / ((raws[i] + raws[i + 1]) / 2) for i, (p, v) in enumerate(served.items())}


def ratios(
    points: list[Point], baselines: dict[str, float], rounds: list, top: int
) -> list[tuple[str, float, float | None]]:
    """(name, value, target) of the service ÷ raw and batching-gain ratios."""
    rate = {(p.path, p.inputs, p.x): p.result.items_per_s for p in points}
    out: list[tuple[str, float, float | None]] = []
    for path in ("embedded", "triton"):
        if (path, IMAGES, top) not in rate:
            continue
        r = lambda kind, x=top, path=path: rate.get((path, kind, x), float("nan"))  # noqa: E731
        out += [
            (f"{path}: {name} c{top} ÷ raw {raw_name} b{top}", r(kind) / baselines[base], target)
            for name, kind, raw_name, base, target in SERVICE_RATIOS
        ]
        out += [
            (f"{path}: batching gain, {k} c{top} ÷ c1", r(k) / r(k, 1), None) for k in SERVICE_KINDS
        ]
    for path in rounds[0][1] if rounds else ():
        name = f"{path}: images c{top} ÷ raw images b{top}, median of {len(rounds)} paired rounds"
        out.append((name, float(np.median([round_ratios(*r)[path] for r in rounds])), IMAGE_TARGET))
    return out


def verdict(value: float, target: float | None) -> str:
    return "info" if target is None else ("PASS" if value >= target else "MISS")


def write_report(
    args: argparse.Namespace, points: list[Point], rechecks: list[Point], rounds: list,
    raw: Raw, info: list, out_md: Path,
) -> tuple[str, list[str]]:  # fmt: skip
    """The Markdown report (`out_md` names the chart beside it) and the verdict lines."""
    first = {p.inputs: p.result.items_per_s for p in points if p.path == "raw" and p.x == args.top}
    again = {p.inputs: p.result.items_per_s for p in rechecks}
    baselines = {
        k: float(np.mean([v[k] for v in (first, again) if k in v] or [np.nan])) for k in RAW_KINDS
    }
    baseline_rows = [  # the first and repeated raw rate at the top batch, the drift
        [kind, h.fmt(first[kind]), h.fmt(again.get(kind, float("nan"))),
         f"{100 * (again[kind] / first[kind] - 1):+.0f} %" if kind in again else "–",
         h.fmt(baselines[kind])]
        for kind in RAW_KINDS if kind in first
    ]  # fmt: skip
    lines = ratios(points, baselines, rounds, args.top)
    mix, short = ([len(t.ids) for t in raw.tokens[k]] for k in (MIX_REAL, SHORT_REAL))
    buckets = Counter(raw.tokenizer.bucket_length(n) for n in mix)
    shares = ", ".join(f"≤{k}: {100 * v / len(mix):.0f} %" for k, v in sorted(buckets.items()))
    classes = ", ".join(f"{name} {share} %" for name, _, share in CAPTION_MIX)
    ratio_rows = [[n, f"{v:.2f}×", f"≥ {t:g}×" if t else "", verdict(v, t)] for n, v, t in lines]
    paired = []
    if rounds:  # raw items/s in order, each path's items/s and ratio
        paired_rows = [
            [n, " → ".join(h.fmt(v) for v in raws),
             *(f"{h.fmt(served[p])} ({x:.2f}×)" for p, x in round_ratios(raws, served).items())]
            for n, (raws, served) in enumerate(rounds, 1)
        ]  # fmt: skip
        headers = [
            "round",
            "raw items/s, in order",
            *(f"{p} items/s (÷ raw)" for p in rounds[0][1]),
        ]
        paired = [
            "## Paired rounds (images)", "",
            f"Raw at batch {args.top}, then each service path at {args.top} callers, then raw "
            "again; a path's ratio uses the mean of the raw points around it; the `median` "
            "verdicts use the median round.", "", h.md_table(headers, paired_rows), "",
        ]  # fmt: skip
    text = [
        *h.report_head(f"Throughput: {args.model} on {args.device}", info),
        f"- Images: {raw.image_note}.",
        f"- Short captions: {min(short)}–{max(short)} tokens with start and end "
        f"(mean {np.mean(short):.1f}).",
        f"- Caption mix: {classes}; {min(mix)}–{max(mix)} tokens (mean {np.mean(mix):.1f}); by "
        f"gateway length bucket: {shares}.",
        f"- Each point: ≥ {args.seconds:g} s and ≥ {args.min_rounds} round(s) of calls (raw: "
        f"≥ {args.min_iters} batches) after a warm-up; latency per call (raw: per batch). How "
        "inputs, points and `mean batch` are kept fair: bench/README.md.",
        "", "## Points", "", h.md_table(POINT_HEADERS, [p.row() for p in points]), "",
        "## Baselines for the ratios", "",
        "The raw top-batch points measured again after the service points; the ratios use the "
        "mean of both (`--quick`: the first only).", "",
        h.md_table(BASELINE_HEADERS, baseline_rows), "", *paired,
        "## Ratios", "", h.md_table(["ratio", "value", "target", "verdict"], ratio_rows), "",
        "Targets (from the issues) are for ViT-B-32; on other models the verdicts inform.", "",
        f"![throughput and p99 latency]({out_md.with_suffix('.png').name})", "",
    ]  # fmt: skip
    targets = [(n, v, t) for n, v, t in lines if t is not None]
    return "\n".join(text), [
        f"{verdict(v, t)}: {n} = {v:.2f}× (target ≥ {t:g}×)" for n, v, t in targets
    ]


def plot(points: list[Point], title: str, out_png: Path) -> None:
    """Throughput and p99 latency against concurrency (batch for raw), one line per path
    and input; images above, texts below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    series: dict[tuple[str, str], list[Point]] = {}
    for p in sorted(points, key=lambda p: p.x):
        series.setdefault((p.path, p.inputs), []).append(p)
    for (path, kind), ps in sorted(series.items()):
        label = f"{path}: {kind}" + (" (x = batch)" if path == "raw" else "")
        style = {"raw": "--", "embedded": "-", "triton": ":"}[path]
        rates, p99 = [p.result.items_per_s for p in ps], [p.result.percentile_ms(99) for p in ps]
        for ax, ys in zip(axes[int(kind != IMAGES)], (rates, p99), strict=True):
            ax.plot([p.x for p in ps], ys, style, marker="o", label=label)
    for (row, modality), (col, what) in itertools.product(
        enumerate(("images", "texts")), enumerate(("throughput", "p99 latency"))
    ):
        ax = axes[row][col]
        ylabel = f"{modality}/s" if col == 0 else "p99 latency, ms (raw: per batch)"
        xlabel = "concurrent single-item callers (raw module: batch size)"
        ax.set(ylabel=ylabel, yscale="log", xlabel=xlabel, title=f"{modality}: {what}")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 8, 32], ["1", "8", "32"])
        ax.grid(True, alpha=0.3)
        if col == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = h.parser(__doc__)
    p.add_argument("--seconds", type=float, help="seconds per point (default 5, --quick 2)")
    p.add_argument("--with-triton", action="store_true", help="also a gateway over Triton")
    p.add_argument("--quick", action="store_true", help="shorter points, one measured round")
    p.add_argument("--device", default="cpu", help="raw module's and embedded gateway's")
    p.add_argument(
        "--image-size", choices=("photo", "model"), default="photo", help="640×480 / S×S"
    )
    p.add_argument("--concurrency", default="1,8,32", help="service's (the last: the ratios')")
    p.add_argument("--batches", default="1,8,32", help="raw's (with the last concurrency)")
    p.add_argument("--paired-rounds", type=int, default=0, help="then N rounds raw → service")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--results-dir", type=Path, default=h.RESULTS_DIR)
    args = p.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 5.0)
    args.min_iters, args.min_rounds = (2, 1) if args.quick else (3, 2)
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.batch_sizes = [int(b) for b in args.batches.split(",")]
    args.top = args.concurrencies[-1]
    args.paths = ["embedded", *(["triton"] if args.with_triton else [])]
    if args.top not in args.batch_sizes or 1 not in args.concurrencies:
        p.error("--batches must include the last concurrency, and --concurrency must include 1")
    return args


async def run(args: argparse.Namespace) -> int:
    h.section(f"throughput: {args.model} on {args.device}")
    info = h.machine_info(args.torch_threads)
    repository = h.model_repository(args.model)
    metadata = ModelMetadata.load(repository)
    raw = Raw(repository, metadata, args)
    print(f"  model repository: {repository}\n  images: {raw.image_note}")
    h.section("raw module")
    points = await raw.measure(args.batch_sizes)
    for path in args.paths:
        h.section(f"service: {path} gateway")
        async with service(path, repository, metadata, args) as gateway:
            points += await measure_service(path, gateway, raw, args.concurrencies)
    rechecks = []
    if not args.quick:  # --quick trusts the first raw points: one pass saves ~1 min on ViT
        h.section("raw module again (drift check of the ratio baselines)")
        rechecks = await raw.measure([args.top])
    rounds = []
    if args.paired_rounds > 0:
        h.section(f"paired rounds: images, raw b{args.top} then service c{args.top}")
        rounds = await paired_rounds(raw, repository, metadata, args)
    device = "" if args.device == "cpu" else f"-{args.device.replace(':', '')}"
    tag = f"-{args.tag}" if args.tag else ""
    out_md = args.results_dir / f"throughput-{args.model}{device}{tag}.md"
    text, verdicts = write_report(args, points, rechecks, rounds, raw, info, out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    png = out_md.with_suffix(".png")
    plot(points, f"{args.model} on {args.device}: throughput and p99 latency", png)
    h.write_result(out_md, text, "\n".join([text.split("## Points", 1)[1], *verdicts]), png)
    return 0


if __name__ == "__main__":
    sys.exit(h.main("bench.throughput", parse_args(), run))
