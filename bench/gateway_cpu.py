"""Gateway CPU per image, and what pre-sized pixels and --fast-jpeg change (issue 28).

    python -m bench.gateway_cpu              # ~10-15 min on 2 busy cores
    python -m bench.gateway_cpu --quick      # fewer images and rounds

Four sections (CPU per image, cores per GPU, embed-dir, --fast-jpeg quality): see
bench/README.md. Writes bench/results/gateway-cpu.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from bench import harness as h
from service.api.clip.v1 import clip_pb2
from service.core.image_preprocess import (
    ImageLimits,
    ImageSpec,
    image_pixels,
    preprocess_image_bytes,
)
from service.processes.gateway import GatewayProcess
from service.processes.triton_server import TritonProcess

LIMITS = ImageLimits(max_bytes=50_000_000, max_pixels=50_000_000)
BATCH = 8
#: One forward pass on one GPU, images/s (timm's benchmark tables: RTX 4090, AMP,
#: PyTorch 2.x, batch 256; vit_base_patch32_clip_224 and vit_large_patch14_clip_224),
#: as issue 28 quotes them.
GPU_RATES = {"ViT-B/32": 12_000.0, "ViT-L/14": 785.0}
#: (label, size, format, images per round, measured with --fast-jpeg too). JPEGs whose
#: short side is under 4 × 224 decode at full size with --fast-jpeg as well.
KINDS = [
    ("224×224 JPEG", (224, 224), "JPEG", 64, False),
    ("640×480 JPEG", (640, 480), "JPEG", 32, False),
    ("1920×1080 JPEG", (1920, 1080), "JPEG", 16, True),
    ("12 MP JPEG (4000×3000)", (4000, 3000), "JPEG", 8, True),
    ("1920×1080 PNG", (1920, 1080), "PNG", 8, False),
]
PIXELS_PER_ROUND = 128


# ---------------------------------------------------------------------------- inputs
def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def variants(size: tuple[int, int], fmt: str, n: int) -> list[bytes]:
    """`n` (≤ 12) different pictures of `size`: each photo upscaled/cropped, and flipped."""
    out = []
    for i, image in enumerate(h.source_photos() * 2):
        if len(out) == n:
            break
        scale = max(size[0] / image.width, size[1] / image.height)
        resized = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
        )
        resized = resized.crop((0, 0, *size))
        out.append(
            encode(resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i >= 6 else resized, fmt)
        )
    return out


def tagged(blob: bytes, tag: int) -> bytes:
    """The same picture with other bytes: a JPEG comment or a PNG tEXt chunk holding `tag`."""
    if blob[:2] == b"\xff\xd8":
        return h.unique_jpeg(blob, tag)
    chunk = b"tEXt" + b"tag\0" + f"bench {tag}".encode()
    body = len(chunk) - 4
    end = blob.rindex(b"IEND") - 4
    crc = zlib.crc32(chunk).to_bytes(4, "big")
    return blob[:end] + body.to_bytes(4, "big") + chunk + crc + blob[end:]


def tagged_pixels(pixels: bytes, tag: int) -> bytes:
    """Other pixels, same length: the first three bytes hold `tag`."""
    return tag.to_bytes(3, "big") + pixels[3:]


# ---------------------------------------------------------------------------- CPU clocks
def process_cpu_ns(pid: int) -> int:
    """CPU time of every live thread of `pid`, in ns (schedstat: finer than utime's ticks)."""
    total = 0
    for task in os.scandir(f"/proc/{pid}/task"):
        try:
            with open(f"{task.path}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except (OSError, ValueError):
            continue
    return total


def idle_rate(pid: int, seconds: float = 2.0) -> float:
    """CPU ns per wall second the gateway spends with no calls (health, metrics, gRPC)."""
    before, start = process_cpu_ns(pid), time.perf_counter()
    time.sleep(seconds)
    return (process_cpu_ns(pid) - before) / (time.perf_counter() - start)


async def send(target: str, requests: list[bytes], concurrency: int = 2) -> None:
    """Each serialized EmbedImage request once, `concurrency` at a time."""
    options = [("grpc.max_send_message_length", 256 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary("/clip.v1.ClipService/EmbedImage")
        queue = list(reversed(requests))

        async def worker() -> None:
            while queue:
                await call(queue.pop(), timeout=600)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def measure(
    gateway: GatewayProcess, idle_ns_per_s: float, requests: list[bytes], images: int
) -> float:
    """Gateway CPU ms per image for these requests (its idle rate taken out)."""
    pid = gateway.pid
    assert pid is not None
    before, start = process_cpu_ns(pid), time.perf_counter()
    asyncio.run(send(gateway.target, requests))
    used = process_cpu_ns(pid) - before - idle_ns_per_s * (time.perf_counter() - start)
    return used / images / 1e6


def batches(items: list[bytes], field: str) -> list[bytes]:
    """Serialized EmbedImage requests of `BATCH` items (made before the clock runs)."""
    return [
        clip_pb2.EmbedImageRequest(**{field: items[i : i + BATCH]}, format=1).SerializeToString()
        for i in range(0, len(items), BATCH)
    ]


def export(model: str, weights: str, name: str) -> Path:
    """An exported (python flavor) repository, cached in bench/.models/."""
    from service.settings import BatchingOptions

    return h.exported(h.MODELS_DIR / name, model, weights, batching=BatchingOptions())


def instant_repository(real: Path, into: Path) -> Path:
    """`real` (an exported repository) with each tower's `model.pt` replaced by a cheap
    TorchScript of the same input and output shapes (normalized vectors)."""
    import json
    import shutil

    import torch

    dim = json.loads((real / "metadata.json").read_text())["embedding_dim"]

    class Instant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(1, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mean = x.float().flatten(1).mean(dim=1, keepdim=True)
            v = (mean + 1.0) * self.weight
            return torch.nn.functional.normalize(v, dim=1)

    shutil.copytree(real, into, ignore=shutil.ignore_patterns("model.pt", "__pycache__"))
    for version in into.glob("*/1"):
        torch.jit.save(torch.jit.script(Instant().eval()), str(version / "model.pt"))
    return into


# ---------------------------------------------------------------------------- 1. CPU
def cpu_per_image(rounds: int, scale: float) -> dict[str, dict[str, float]]:
    """{kind: {"exact": ms, "fast": ms}} plus {"pixels": {"exact": ms}}: median of rounds."""
    tmp = tempfile.TemporaryDirectory()
    real = export("ViT-B-32", "none", "ViT-B-32-none")
    repository = instant_repository(real, Path(tmp.name) / "repo")
    blobs = {label: variants(size, fmt, 12) for label, size, fmt, *_ in KINDS}
    spec = ImageSpec(224)
    pixels = image_pixels(blobs[KINDS[1][0]][0], spec, LIMITS)
    samples: dict[str, dict[str, list[float]]] = {}
    common = {"backend": "triton", "local_cache_items": 0, "max_batch_size": 32}
    with TritonProcess(repository) as triton:
        with (
            GatewayProcess(repository, triton_url=triton.grpc_url, **common) as exact,
            GatewayProcess(
                repository, triton_url=triton.grpc_url, fast_jpeg=True, **common
            ) as fast,
        ):
            idle = {id(g): idle_rate(g.pid or 0) for g in (exact, fast)}
            tag = 0
            # One unmeasured round: Triton and both gateways warm at every batch shape.
            for round_index in range(rounds + 1):
                for label, _, _, per_round, with_fast in KINDS:
                    n = max(BATCH, int(per_round * scale) // BATCH * BATCH)
                    for path, gateway in (("exact", exact), ("fast", fast)):
                        if path == "fast" and not with_fast:
                            continue
                        items = [tagged(blobs[label][(tag + i) % 12], tag + i) for i in range(n)]
                        tag += n
                        ms = measure(gateway, idle[id(gateway)], batches(items, "images"), n)
                        if round_index:
                            samples.setdefault(label, {}).setdefault(path, []).append(ms)
                n = max(BATCH, int(PIXELS_PER_ROUND * scale) // BATCH * BATCH)
                items = [tagged_pixels(pixels, tag + i) for i in range(n)]
                tag += n
                ms = measure(exact, idle[id(exact)], batches(items, "pixels"), n)
                if round_index:
                    samples.setdefault("pixels", {}).setdefault("exact", []).append(ms)
                print(f"round {round_index}: {summary_line(samples)}", flush=True)
    tmp.cleanup()
    return {k: {p: statistics.median(v) for p, v in d.items()} for k, d in samples.items()}


def summary_line(samples: dict[str, dict[str, list[float]]]) -> str:
    return "; ".join(
        f"{k.split(' (')[0]} " + "/".join(f"{p} {v[-1]:.2f}" for p, v in d.items())
        for k, d in samples.items()
    )


# ---------------------------------------------------------------------------- 3. embed-dir
def embed_dir(rounds: int, n_photos: int) -> tuple[list[list[object]], str]:
    """Rows of the embed-dir table and a line on the vectors."""
    repository = export("clip-demo-shapes", str(h.DEMO_WEIGHTS), "clip-demo-shapes-bench")
    modes = {
        "--no-pixels (today)": ["--no-pixels"],
        "--pixels --workers 2": ["--pixels", "--workers", "2"],
        "--pixels --workers 2 --fast-jpeg": ["--pixels", "--workers", "2", "--fast-jpeg"],
    }
    files = dict(zip(modes, ("today.npy", "pixels.npy", "fast.npy"), strict=True))
    wall: dict[str, list[float]] = {m: [] for m in modes}
    client_cpu: dict[str, list[float]] = {m: [] for m in modes}
    gateway_cpu: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, blob in enumerate(variants((4000, 3000), "JPEG", n_photos)):
            (folder / f"{i:02d}.jpg").write_bytes(blob)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_")}
        with GatewayProcess(repository, local_cache_items=0, max_batch_size=1) as gateway:
            env["CLIP_TARGET"] = gateway.target
            pid = gateway.pid or 0
            for _ in range(rounds):
                for mode, flags in modes.items():
                    out = Path(tmp) / files[mode]
                    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu, start = process_cpu_ns(pid), time.perf_counter()
                    command = ["embed-dir", str(folder), "--out", str(out), *flags]
                    subprocess.run(
                        [sys.executable, "-m", "service.cli", *command],
                        env=env,
                        check=True,
                        capture_output=True,
                        cwd=h.REPO_ROOT,
                    )
                    wall[mode].append(time.perf_counter() - start)
                    gateway_cpu[mode].append((process_cpu_ns(pid) - cpu) / 1e9)
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    client_cpu[mode].append(
                        after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
                    )
                    print(f"embed-dir {mode}: {wall[mode][-1]:.1f} s", flush=True)
        today, exact, fast = (np.load(Path(tmp) / name) for name in files.values())
    base = statistics.median(wall["--no-pixels (today)"])
    rows = [
        [
            mode,
            f"{statistics.median(wall[mode]):.1f}",
            f"{base / statistics.median(wall[mode]):.2f}×",
            f"{statistics.median(client_cpu[mode]) / n_photos * 1000:.0f}",
            f"{statistics.median(gateway_cpu[mode]) / n_photos * 1000:.1f}",
        ]
        for mode in modes
    ]
    cos = (today * fast).sum(axis=1)
    vectors = (
        f"--pixels vectors equal --no-pixels ones bit for bit: {np.array_equal(today, exact)} "
        f"(max |Δ| {np.abs(today - exact).max():.1e}); --fast-jpeg cosine to them: "
        f"min {cos.min():.5f}, mean {cos.mean():.5f}"
    )
    return rows, vectors


# ---------------------------------------------------------------------------- 4. quality
def quality() -> list[list[object]]:
    """Per model and size: cosine of --fast-jpeg to the exact path, top-1 agreement."""
    import open_clip
    import torch

    from service.demo.shapes import ALL_PAIRS
    from service.model.export import load_open_clip

    imagenetish = [
        "cat", "dog", "astronaut", "rocket", "cup of coffee", "flower", "building", "man",
        "woman", "car", "tree", "mountain", "beach", "city", "bird", "food", "sky", "boat",
    ]  # fmt: skip
    models = {
        "demo (clip-demo-shapes)": (
            "clip-demo-shapes", str(h.DEMO_WEIGHTS), [f"a {c} {s}" for c, s in ALL_PAIRS]
        ),
        "ViT-B-32 (random weights)": ("ViT-B-32", "none", [f"a photo of {x}" for x in imagenetish]),
    }  # fmt: skip
    sizes = {"full size": None, "long side 1920": 1920, "long side 4000 (12 MP)": 4000}
    rows = []
    for label, (name, weights, prompts) in models.items():
        torch.manual_seed(0)
        clip, _ = load_open_clip(name, weights)
        meta = clip.visual.image_size
        size = meta[0] if isinstance(meta, tuple | list) else int(meta)
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        tokenizer = open_clip.get_tokenizer(name)
        with torch.no_grad():
            texts = clip.encode_text(tokenizer(prompts), normalize=True)

        def embed(
            blobs: list[bytes], fast: bool, clip=clip, size=size, mean=mean, std=std
        ) -> torch.Tensor:
            arrays = [
                preprocess_image_bytes(b, ImageSpec(size, fast_jpeg=fast), LIMITS) for b in blobs
            ]
            batch = torch.from_numpy(np.stack(arrays)).float() / 255.0
            with torch.no_grad():
                return clip.encode_image((batch - mean) / std, normalize=True)

        for size_label, long_side in sizes.items():
            blobs = []
            for image in h.source_photos():
                if long_side:
                    scale = long_side / max(image.size)
                    image = image.resize(
                        (round(image.width * scale), round(image.height * scale)),
                        Image.Resampling.BICUBIC,
                    )
                blobs.append(encode(image, "JPEG"))
            exact, fast = embed(blobs, False), embed(blobs, True)
            cos = (exact * fast).sum(dim=1)
            agree = ((exact @ texts.T).argmax(1) == (fast @ texts.T).argmax(1)).float().mean()
            row = [label, size_label, len(blobs), f"{cos.min():.5f}", f"{cos.mean():.5f}"]
            rows.append([*row, f"{agree:.0%}"])
            print(f"quality {label} {size_label}: {rows[-1][3:]}", flush=True)
    return rows


# ---------------------------------------------------------------------------- report
def table(headers: str, rows: list[list[object]]) -> str:
    """A Markdown table; `headers` separated by `|`."""
    return h.md_table(headers.split("|"), rows)


def report(
    cpu: dict[str, dict[str, float]],
    dirs: tuple[list[list[object]], str],
    qual: list[list[object]],
    args: argparse.Namespace,
) -> str:
    pixels_ms = cpu["pixels"]["exact"]
    cpu_rows, core_rows = [], []
    for label, *_ in KINDS:
        ms = cpu[label]
        fast = ms.get("fast")
        cpu_rows.append([
            label, f"{ms['exact']:.2f}", f"{1000 / ms['exact']:.0f}",
            f"{fast:.2f}" if fast else "–", f"{fast / ms['exact']:.0%}" if fast else "–",
            f"{pixels_ms / ms['exact']:.2%}",
        ])  # fmt: skip
        for gpu, rate in GPU_RATES.items():
            core_rows.append([
                gpu, label, f"{rate * ms['exact'] / 1000:.1f}",
                f"{rate * fast / 1000:.1f}" if fast else "–", f"{rate * pixels_ms / 1000:.2f}",
            ])  # fmt: skip
    pixels_row = [
        "pre-sized pixels (224×224×3 bytes)",
        f"{pixels_ms:.3f}",
        f"{1000 / pixels_ms:.0f}",
    ]
    cpu_rows.append([*pixels_row, "–", "–", "100%"])
    dir_rows, vectors = dirs
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    command = "python -m bench.gateway_cpu" + (" --quick" if args.quick else "")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cpu_table = table(
        "input|exact ms/img|img/s per core|--fast-jpeg ms/img|fast ÷ exact|pixels ÷ exact", cpu_rows
    )
    core_table = table(
        "GPU model|input|cores, exact (before)|cores, --fast-jpeg|cores, pixels (after)", core_rows
    )
    dir_table = table(
        "embed-dir|wall s|speed vs today|client CPU ms/img (pool included)|gateway CPU ms/img",
        dir_rows,
    )
    quality_table = table("model|photos|n|cosine min|cosine mean|top-1 agreement", qual)
    return f"""# Gateway CPU per image (issue 28)

`{command}`, {when}; {machine}.
Shared machine: CPU seconds, not wall time, are the figures of sections 1-2 (they move
far less with the load beside us than wall time does). Median of {args.rounds} interleaved
rounds.

## 1. Gateway CPU per image (exact path = today's default, cache off)

The gateway process's CPU (all its threads: gRPC, event loop, hashing, decode pool,
Triton client) per image, in ms, in front of Triton serving ViT-B-32 (S = 224); EmbedImage
batches of {BATCH}. "img/s per core" = 1000 ÷ ms. "fast-jpeg" is a gateway started with
`--fast-jpeg`; "pixels ÷ exact" is what the gateway spends when the client sends
pre-sized pixels instead.

{cpu_table}

## 2. Gateway cores needed to feed one GPU

cores = GPU images/s × gateway CPU seconds per image (section 1). GPU rates: one forward
pass on an RTX 4090 with mixed precision, from timm's published inference benchmark tables
(pytorch-image-models `results/benchmark-infer-amp-nchw-*-rtx4090.csv`, rows
`vit_base_patch32_clip_224` ≈ 12,000 img/s and `vit_large_patch14_clip_224` ≈ 785 img/s, as
quoted in issue 28). Both models take 224×224 input, so the per-image CPU of section 1
applies to both. Before = exact path; after = `--fast-jpeg` or pre-sized pixels.

{core_table}

## 3. `clipsvc embed-dir` over {args.photos} photos of 12 MP

Gateway: embedded demo model, cache off, `--max-batch-size 1` (each vector's forward pass
is then the same whatever order images arrive in, so vectors can be compared bit for
bit). Client and gateway share this machine's cores. CPU columns are ms per image.

{dir_table}

{vectors}.

## 4. What `--fast-jpeg` changes: cosine to the exact path, zero-shot top-1 agreement

Real photos (scikit-image astronaut, chelsea, coffee, rocket; scikit-learn china, flower)
as JPEG (quality 90) at their own size (≤ 640 px: below 4 × 224, so ViT-B-32's path is
unchanged there), upscaled (bicubic) to a long side of 1920 and of 4000 (12 MP at 4:3).
Each image embedded through the exact path and through `--fast-jpeg` (the
gateway's own preprocessing, open_clip's model in this process). Top-1: the argmax over
the model's prompts (demo: its 48 colour-shape captions; ViT-B-32: 18 everyday labels) is
the same on both paths.

{quality_table}
"""


def main(argv: list[str] | None = None) -> int:
    parser = h.parser(__doc__, out="gateway-cpu.md", model=None, threads=False)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photos", type=int, default=12, help="12 MP photos for embed-dir (≤ 12)")
    parser.add_argument("--quick", action="store_true", help="¼ of the images, ≤ 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 2)
    scale = 0.25 if args.quick else 1.0
    qual = quality()
    dirs = embed_dir(args.rounds, args.photos)
    cpu = cpu_per_image(args.rounds, scale)
    text = report(cpu, dirs, qual, args)
    h.write_result(args.out, text, text.split("## 1.", 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
