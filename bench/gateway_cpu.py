"""Gateway CPU per image, and what pre-sized pixels and --fast-jpeg change (issue 28).

    python -m bench.gateway_cpu              # ~1-2 min on 2 quiet cores
    python -m bench.gateway_cpu --quick      # fewer images and rounds

Four sections (CPU per image, cores per GPU, embed-dir, --fast-jpeg quality): see
bench/README.md. Writes bench/results/gateway-cpu.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path
from statistics import median

import numpy as np
from PIL import Image

from bench import harness as h
from service.api.clip.v1 import clip_pb2
from service.core.image_preprocess import ImageLimits, ImageSpec, image_pixels
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
PIXELS_PER_ROUND = 1024  # ~0.6 s of gateway CPU: fewer would measure the idle-rate noise
EMBED_DIR_MODES = {
    "--no-pixels (today)": ["--no-pixels"],
    "--pixels --workers 2": ["--pixels", "--workers", "2"],
    "--pixels --workers 2 --fast-jpeg": ["--pixels", "--workers", "2", "--fast-jpeg"],
}


# ---------------------------------------------------------------------------- inputs
def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def scaled(image: Image.Image, scale: float) -> Image.Image:
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.Resampling.BICUBIC)


def variants(size: tuple[int, int], fmt: str, n: int) -> list[bytes]:
    """`n` (≤ 12) different pictures of `size`: each photo upscaled/cropped, then flipped."""
    photos, out = h.source_photos(), []
    for i in range(n):
        image = photos[i % len(photos)]
        image = scaled(image, max(size[0] / image.width, size[1] / image.height))
        image = image.crop((0, 0, *size))
        flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i >= 6 else image
        out.append(encode(flipped, fmt))
    return out


def tagged(blob: bytes, tag: int) -> bytes:
    """The same picture with other bytes: a JPEG comment or a PNG tEXt chunk holding `tag`."""
    if blob[:2] == b"\xff\xd8":
        return h.unique_jpeg(blob, tag)
    chunk = b"tEXt" + b"tag\0" + f"bench {tag}".encode()
    end = blob.rindex(b"IEND") - 4
    crc = zlib.crc32(chunk).to_bytes(4, "big")
    return blob[:end] + (len(chunk) - 4).to_bytes(4, "big") + chunk + crc + blob[end:]


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


def cpu_ms(gateway: GatewayProcess, idle_ns_per_s: float, field: str, items: list[bytes]) -> float:
    """Gateway CPU ms per item to embed `items` (EmbedImage `field`, batches of BATCH, two
    in flight; serialized before the clock runs), its idle rate taken out."""
    requests = [
        clip_pb2.EmbedImageRequest(**{field: items[i : i + BATCH]}, format=1).SerializeToString()
        for i in range(0, len(items), BATCH)
    ][::-1]

    async def send() -> None:
        async with h.channel(gateway.target) as channel:
            call = channel.unary_unary(h.SERVICE + "EmbedImage")

            async def worker() -> None:
                while requests:
                    await call(requests.pop(), timeout=600)

            await asyncio.gather(worker(), worker())

    pid = gateway.pid or 0
    before, start = process_cpu_ns(pid), time.perf_counter()
    asyncio.run(send())
    used = process_cpu_ns(pid) - before - idle_ns_per_s * (time.perf_counter() - start)
    return used / len(items) / 1e6


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
            return torch.nn.functional.normalize((mean + 1.0) * self.weight, dim=1)

    shutil.copytree(real, into, ignore=shutil.ignore_patterns("model.pt", "__pycache__"))
    for version in into.glob("*/1"):
        torch.jit.save(torch.jit.script(Instant().eval()), str(version / "model.pt"))
    return into


# ---------------------------------------------------------------------------- 1. CPU
def cpu_per_image(rounds: int, scale: float) -> dict[str, dict[str, float]]:
    """{kind: {"exact": ms, "fast": ms}} plus {"pixels": {"exact": ms, "shm": ms}}: median of
    rounds ("shm": a gateway with --triton-shared-memory)."""
    blobs = {label: variants(size, fmt, 12) for label, size, fmt, *_ in KINDS}
    pixels = image_pixels(blobs[KINDS[1][0]][0], ImageSpec(224), LIMITS)
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    common = {"backend": "triton", "local_cache_items": 0, "max_batch_size": 32}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        real = export("ViT-B-32", "none", "ViT-B-32-none")
        repository = instant_repository(real, Path(tmp) / "repo")
        triton = stack.enter_context(TritonProcess(repository))
        common["triton_url"] = triton.grpc_url
        exact = stack.enter_context(GatewayProcess(repository, **common))
        fast = stack.enter_context(GatewayProcess(repository, fast_jpeg=True, **common))
        shm = stack.enter_context(GatewayProcess(repository, triton_shared_memory=True, **common))
        idle = {
            p: idle_rate(g.pid or 0) for p, g in (("exact", exact), ("fast", fast), ("shm", shm))
        }
        points = [
            (label, path, gateway, "images", per_round, blobs[label])
            for label, _, _, per_round, with_fast in KINDS
            for path, gateway in (("exact", exact), ("fast", fast))
            if with_fast or path == "exact"
        ] + [
            ("pixels", p, g, "pixels", PIXELS_PER_ROUND, None)
            for p, g in (("exact", exact), ("shm", shm))
        ]
        tag = 0
        # One unmeasured round: Triton and both gateways warm at every batch shape.
        for round_index in range(rounds + 1):
            for label, path, gateway, field, per_round, pool in points:
                n = max(BATCH, int(per_round * scale) // BATCH * BATCH)
                items = [  # new bytes each: a comment or chunk, or other first pixels
                    tagged(pool[(tag + i) % 12], tag + i)
                    if pool
                    else (tag + i).to_bytes(3, "big") + pixels[3:]
                    for i in range(n)
                ]
                tag += n
                ms = cpu_ms(gateway, idle[path], field, items)
                if round_index:
                    samples[label][path].append(ms)
            last = "; ".join(
                f"{k.split(' (')[0]} " + "/".join(f"{p} {v[-1]:.2f}" for p, v in d.items())
                for k, d in samples.items()
            )
            print(f"round {round_index}: {last}", flush=True)
    return {k: {p: median(v) for p, v in d.items()} for k, d in samples.items()}


# ---------------------------------------------------------------------------- 3. embed-dir
def embed_dir(rounds: int, n_photos: int) -> tuple[list[list[object]], str]:
    """Rows of the embed-dir table and a line on the vectors."""
    repository = export("clip-demo-shapes", str(h.DEMO_WEIGHTS), "clip-demo-shapes-bench")
    files = dict(zip(EMBED_DIR_MODES, ("today.npy", "pixels.npy", "fast.npy"), strict=True))
    seconds: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, blob in enumerate(variants((4000, 3000), "JPEG", n_photos)):
            (folder / f"{i:02d}.jpg").write_bytes(blob)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_")}
        with GatewayProcess(repository, local_cache_items=0, max_batch_size=1) as gateway:
            env["CLIP_TARGET"], pid = gateway.target, gateway.pid or 0
            for mode, flags in [*EMBED_DIR_MODES.items()] * rounds:
                usage = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu, start = process_cpu_ns(pid), time.perf_counter()
                command = ["embed-dir", str(folder), "--out", str(Path(tmp) / files[mode])]
                subprocess.run(
                    [sys.executable, "-m", "service.cli", *command, *flags],
                    env=env, check=True, capture_output=True, cwd=h.REPO_ROOT,
                )  # fmt: skip
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                seconds[mode]["wall"].append(time.perf_counter() - start)
                seconds[mode]["gateway"].append((process_cpu_ns(pid) - cpu) / 1e9)
                client = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
                seconds[mode]["client"].append(client)
                print(f"embed-dir {mode}: {seconds[mode]['wall'][-1]:.1f} s", flush=True)
        today, exact, fast = (np.load(Path(tmp) / name) for name in files.values())
    mid = {m: {k: median(v) for k, v in s.items()} for m, s in seconds.items()}
    base = mid["--no-pixels (today)"]["wall"]
    rows = [
        [mode, f"{s['wall']:.1f}", f"{base / s['wall']:.2f}×",
         f"{s['client'] / n_photos * 1000:.0f}", f"{s['gateway'] / n_photos * 1000:.1f}"]
        for mode, s in mid.items()
    ]  # fmt: skip
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

    from service.core import image_preprocess as ip
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
    mean, std = (
        torch.tensor(v).view(1, 3, 1, 1)
        for v in (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    )
    rows = []
    for label, (name, weights, prompts) in models.items():
        torch.manual_seed(0)
        clip, _ = load_open_clip(name, weights)
        size = clip.visual.image_size
        size = size[0] if isinstance(size, tuple | list) else int(size)

        def embed(blobs: list[bytes], fast: bool, clip=clip, size=size) -> torch.Tensor:
            spec = ImageSpec(size, fast_jpeg=fast)
            arrays = np.stack([ip.preprocess_image_bytes(b, spec, LIMITS) for b in blobs])
            batch = torch.from_numpy(arrays).float() / 255.0
            return clip.encode_image((batch - mean) / std, normalize=True)

        with torch.no_grad():
            texts = clip.encode_text(open_clip.get_tokenizer(name)(prompts), normalize=True)
            for size_label, long_side in sizes.items():
                photos = [scaled(p, long_side / max(p.size)) if long_side else p
                          for p in h.source_photos()]  # fmt: skip
                blobs = [encode(p, "JPEG") for p in photos]
                exact, fast = embed(blobs, False), embed(blobs, True)
                cos = (exact * fast).sum(dim=1)
                agree = ((exact @ texts.T).argmax(1) == (fast @ texts.T).argmax(1)).float().mean()
                rows.append([label, size_label, len(blobs), f"{cos.min():.5f}",
                             f"{cos.mean():.5f}", f"{agree:.0%}"])  # fmt: skip
                print(f"quality {label} {size_label}: {rows[-1][3:]}", flush=True)
    return rows


# ---------------------------------------------------------------------------- report
def table(headers: str, rows: list[list[object]]) -> str:
    """A Markdown table; `headers` separated by `|`."""
    return h.md_table(headers.split("|"), rows)


def report(
    cpu: dict, dirs: tuple[list[list[object]], str], qual: list, rounds: int, photos: int,
    quick: bool, load_start: float,
) -> str:  # fmt: skip
    """The whole Markdown report."""
    px, shm = cpu["pixels"]["exact"], cpu["pixels"]["shm"]
    cpu_rows, core_rows = [], []
    for label, *_ in KINDS:
        exact, fast = cpu[label]["exact"], cpu[label].get("fast")
        cpu_rows.append([
            label, f"{exact:.2f}", f"{1000 / exact:.0f}", f"{fast:.2f}" if fast else "–",
            f"{fast / exact:.0%}" if fast else "–", f"{px / exact:.2%}",
        ])  # fmt: skip
        core_rows += [
            [gpu, label, f"{rate * exact / 1000:.1f}",
             f"{rate * fast / 1000:.1f}" if fast else "–", f"{rate * px / 1000:.2f}",
             f"{rate * shm / 1000:.2f}"]
            for gpu, rate in GPU_RATES.items()
        ]  # fmt: skip
    cpu_rows.append(["pre-sized pixels (224×224×3 bytes)", f"{px:.3f}", f"{1000 / px:.0f}",
                     "–", "–", "100%"])  # fmt: skip
    cpu_rows.append(["pre-sized pixels, --triton-shared-memory", f"{shm:.3f}",
                     f"{1000 / shm:.0f}", "–", "–", f"{shm / px:.0%}"])  # fmt: skip
    dir_rows, vectors = dirs
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end"
    )
    command = "python -m bench.gateway_cpu" + (" --quick" if quick else "")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cpu_table = table(
        "input|exact ms/img|img/s per core|--fast-jpeg ms/img|fast ÷ exact|pixels ÷ exact", cpu_rows
    )
    core_table = table(
        "GPU model|input|cores, exact (before)|cores, --fast-jpeg|cores, pixels (after)"
        "|cores, pixels + shared memory",
        core_rows,
    )
    dir_table = table(
        "embed-dir|wall s|speed vs today|client CPU ms/img (pool included)|gateway CPU ms/img",
        dir_rows,
    )
    return f"""# Gateway CPU per image (issue 28)

`{command}`, {when}; {machine}.
Figures of sections 1-2 are CPU seconds, not wall time, median of {rounds} interleaved
rounds. CPU seconds still grow when other work shares the cores (caches, memory
bandwidth): a run beside a test suite measured about twice these, so compare figures of
one run, and run it on a quiet machine.

## 1. Gateway CPU per image (exact path = today's default, cache off)

The gateway process's CPU (all its threads) per image, in ms, in front of Triton serving
ViT-B-32 (S = 224); EmbedImage batches of {BATCH}. "img/s per core" = 1000 ÷ ms;
"--fast-jpeg": a gateway started with it; "pixels": the client sends pre-sized pixels;
"--triton-shared-memory": a gateway that hands Triton its batches through /dev/shm.

{cpu_table}

## 2. Gateway cores needed to feed one GPU

cores = GPU images/s × gateway CPU seconds per image (section 1, 224×224 input for both
models). GPU rates: RTX 4090, mixed precision, timm's inference benchmark tables
(`vit_base_patch32_clip_224` ≈ 12,000 img/s, `vit_large_patch14_clip_224` ≈ 785 img/s,
as issue 28 quotes them). Before = exact path; after = `--fast-jpeg` or pre-sized pixels
(over gRPC bytes, or through shared memory).

{core_table}

## 3. `clipsvc embed-dir` over {photos} photos of 12 MP

Embedded demo gateway, cache off, `--max-batch-size 1` (vectors then compare bit for
bit whatever the arrival order); client and gateway share the cores; CPU in ms per image.

{dir_table}

{vectors}.

## 4. What `--fast-jpeg` changes: cosine to the exact path, zero-shot top-1 agreement

Real photos (scikit-image, scikit-learn) as JPEG (quality 90) at their own size (≤ 640
px: ViT-B-32's path is unchanged there) and upscaled to a long side of 1920 and 4000,
embedded through both paths in this process. Top-1: the argmax over the model's prompts
(demo: its 48 colour-shape captions; ViT-B-32: 18 everyday labels) is the same.

{table("model|photos|n|cosine min|cosine mean|top-1 agreement", qual)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = h.parser(__doc__, out="gateway-cpu.md", model=None, threads=False)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photos", type=int, default=12, help="12 MP photos for embed-dir (≤ 12)")
    parser.add_argument("--quick", action="store_true", help="¼ of the images, ≤ 2 rounds")
    args = parser.parse_args(argv)
    rounds = min(args.rounds, 2) if args.quick else args.rounds
    load_start = os.getloadavg()[0]
    qual = quality()
    dirs = embed_dir(rounds, args.photos)
    cpu = cpu_per_image(rounds, 0.25 if args.quick else 1.0)
    text = report(cpu, dirs, qual, rounds, args.photos, args.quick, load_start)
    h.write_result(args.out, text, text.split("## 1.", 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
