"""The onnx flavor (ONNX Runtime) against open_clip's eager model and the TorchScript flavor.

    python -m bench.onnx                 # random ViT-B-32, 3 interleaved rounds, ~5 min
    python -m bench.onnx --rounds 5 --seconds 8

Measures, on the same machine in the same run, in interleaved rounds (each round measures
every point once, in a rotated order, so a slow minute hits all of them alike):
- open_clip's eager model at batch 32: `encode_image` on pre-decoded photos, and
  `encode_text` on 77-padded captions (what `open_clip.tokenize` gives) — the baseline;
- the forward pass alone at batch 32 on the same pixels: the onnx flavor's `model.onnx`
  in ONNX Runtime and the TorchScript flavor's `model.pt`;
- the service: one embedded gateway per flavor, each in its own process, 32 closed-loop
  callers sending single distinct 640×480 JPEGs or single captions (the caption mix),
  no cache.

Every ratio divides two figures of the same round; the report gives each round and the
median. The issue's targets (#17): onnx flavor through the service ≥ 1.2× the eager model
for images and ≥ 1.0× for texts. Both flavors are exported from the same seeded random
weights as the eager model, and the report states the onnx flavor's max |diff| from it.
Writes bench/results/onnx-<model>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from bench.common import (
    MODELS_DIR,
    RESULTS_DIR,
    GatewayProcess,
    RawClip,
    add_threading_arguments,
    apply_threading,
    channel_options,
    closed_loop,
    fmt,
    machine_info,
    md_table,
    mixed_caption,
    photo_pool,
    section,
    threading_note,
    timed_loop,
    unique_jpeg,
)
from service.api.clip.v1 import clip_pb2
from service.core.image_preprocess import ImageLimits, ImageSpec, preprocess_image_bytes
from service.model.metadata import ModelMetadata

IMAGE_TARGET = 1.2
TEXT_TARGET = 1.0
BATCH = 32
CONCURRENCY = 32
SEED = 0
POOL = 64
PACKED = clip_pb2.VECTOR_FORMAT_FLOAT32_BYTES

EAGER_IMAGES = "eager images b32"
EAGER_TEXTS = "eager texts b32 (77-padded)"
ORT_IMAGES = "onnx forward images b32"
TS_IMAGES = "torchscript forward images b32"
SVC_ONNX_IMAGES = "service onnx images c32"
SVC_ONNX_TEXTS = "service onnx texts c32"
SVC_TS_IMAGES = "service torchscript images c32"
SVC_TS_TEXTS = "service torchscript texts c32"
POINTS = (
    EAGER_IMAGES,
    EAGER_TEXTS,
    ORT_IMAGES,
    TS_IMAGES,
    SVC_ONNX_IMAGES,
    SVC_ONNX_TEXTS,
    SVC_TS_IMAGES,
    SVC_TS_TEXTS,
)
#: (numerator, denominator, target or None): each is computed per round, then the median.
RATIOS = (
    (SVC_ONNX_IMAGES, EAGER_IMAGES, IMAGE_TARGET),
    (SVC_ONNX_TEXTS, EAGER_TEXTS, TEXT_TARGET),
    (SVC_TS_IMAGES, EAGER_IMAGES, None),
    (SVC_TS_TEXTS, EAGER_TEXTS, None),
    (ORT_IMAGES, EAGER_IMAGES, None),
    (TS_IMAGES, EAGER_IMAGES, None),
    (SVC_ONNX_IMAGES, SVC_TS_IMAGES, None),
    (SVC_ONNX_TEXTS, SVC_TS_TEXTS, None),
)


@dataclass
class Round:
    """items/s of every point, measured once each in this round."""

    order: list[str]
    items_per_s: dict[str, float] = field(default_factory=dict)


def seeded_repository(model: str, flavor: str) -> Path:
    """`model` with random weights from seed SEED, exported in `flavor`, cached."""
    import torch

    from service.model.export import export_model

    target = MODELS_DIR / f"{model}-seed{SEED}-{flavor}"
    if (target / "metadata.json").is_file():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"exporting {model} (seed {SEED}, {flavor} flavor) → {target} ...", flush=True)
    torch.manual_seed(SEED)
    summary = export_model(model, "none", partial, flavor=flavor, progress=True)
    print(summary.render(), flush=True)
    partial.rename(target)
    return target


def eager_model(model: str, metadata: ModelMetadata):  # -> torch.nn.Module
    """open_clip's model with the exported weights (same seed), checked by hash."""
    import torch

    from service.model.export import load_open_clip, weights_sha256

    torch.manual_seed(SEED)
    clip, _ = load_open_clip(model, "none")
    if weights_sha256(clip) != metadata.weights_sha256:
        raise RuntimeError("the eager model's weights differ from the exported ones")
    return clip


async def service_point(
    target: str, call_kind: str, jpegs: list[bytes], counter: itertools.count, seconds: float
) -> float:
    """items/s of 32 closed-loop single-item callers against the gateway at `target`."""
    async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
        client = RawClip(channel)

        async def image(i: int) -> int:
            jpeg = unique_jpeg(jpegs[i % len(jpegs)], i)
            request = clip_pb2.EmbedImageRequest(images=[jpeg], format=PACKED)
            await client.embed_image(request.SerializeToString(), timeout=600)
            return 1

        async def text(i: int) -> int:
            request = clip_pb2.EmbedTextRequest(texts=[mixed_caption(i)], format=PACKED)
            await client.embed_text(request.SerializeToString(), timeout=600)
            return 1

        call: Callable[[int], Awaitable[int]] = image if call_kind == "images" else text
        result = await closed_loop(
            call,
            label=f"{target} {call_kind}",
            concurrency=CONCURRENCY,
            seconds=seconds,
            min_calls=2 * CONCURRENCY,
            counter=counter,
        )
    if result.errors:
        raise RuntimeError(f"service errors: {result.error_text}")
    return result.items_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each point")
    add_threading_arguments(parser)
    args = parser.parse_args()
    apply_threading(args, "bench.onnx")

    import open_clip
    import torch

    from service.model.onnx_graphs import open_session, run_session

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    section("models")
    onnx_repo = seeded_repository(args.model, "onnx")
    ts_repo = seeded_repository(args.model, "python")
    metadata = ModelMetadata.load(onnx_repo)
    clip = eager_model(args.model, metadata)

    jpegs = photo_pool(POOL, (640, 480))
    spec = ImageSpec(metadata.image_size, metadata.interpolation)
    limits = ImageLimits(20 * 1024 * 1024, 50_000_000, True)
    pixels = np.stack([preprocess_image_bytes(j, spec, limits) for j in jpegs])
    mean = torch.tensor(metadata.mean).view(1, 3, 1, 1)
    std = torch.tensor(metadata.std).view(1, 3, 1, 1)
    normalized = (torch.from_numpy(pixels).float() / 255 - mean) / std
    tokenizer = open_clip.get_tokenizer(args.model)
    tokens77 = tokenizer([mixed_caption(i) for i in range(POOL)])

    image_session = open_session(
        onnx_repo / "clip_image" / "1" / "model.onnx", intra_op_threads=args.torch_threads
    )
    text_session = open_session(
        onnx_repo / "clip_text" / "1" / "model.onnx", intra_op_threads=args.torch_threads
    )
    image_ts = torch.jit.load(str(ts_repo / "clip_image" / "1" / "model.pt")).eval()
    with torch.no_grad():
        want_images = clip.encode_image(normalized[:8], normalize=True).numpy()
        want_texts = clip.encode_text(tokens77[:8], normalize=True).numpy()
    got_images = run_session(image_session, metadata.image_input, pixels[:8])
    got_texts = run_session(text_session, metadata.text_input, tokens77[:8].numpy())
    parity = (
        float(np.abs(want_images - got_images).max()),
        float(np.abs(want_texts - got_texts).max()),
    )
    print(f"onnx flavor vs eager: images {parity[0]:.2e}, texts {parity[1]:.2e}", flush=True)

    def rows(pool_size: int, i: int) -> list[int]:
        return [(i * BATCH + k) % pool_size for k in range(BATCH)]

    def eager_images(i: int) -> int:
        with torch.inference_mode():
            clip.encode_image(normalized[rows(POOL, i)], normalize=True)
        return BATCH

    def eager_texts(i: int) -> int:
        with torch.inference_mode():
            clip.encode_text(tokens77[rows(POOL, i)], normalize=True)
        return BATCH

    def ort_images(i: int) -> int:
        run_session(image_session, metadata.image_input, pixels[rows(POOL, i)])
        return BATCH

    def ts_images(i: int) -> int:
        with torch.inference_mode():
            image_ts(torch.from_numpy(pixels[rows(POOL, i)]))
        return BATCH

    local = {
        EAGER_IMAGES: eager_images,
        EAGER_TEXTS: eager_texts,
        ORT_IMAGES: ort_images,
        TS_IMAGES: ts_images,
    }
    gateway_settings = {
        "local_cache_items": 0,
        "max_batch_size": BATCH,
        "torch_threads": args.torch_threads,
    }
    counter = itertools.count(10_000_000)
    rounds: list[Round] = []
    section(f"{args.rounds} interleaved rounds, {args.seconds:.0f} s per point")
    with (
        GatewayProcess(onnx_repo, log_name="onnx", **gateway_settings) as onnx_gw,
        GatewayProcess(ts_repo, log_name="torchscript", **gateway_settings) as ts_gw,
    ):
        services = {
            SVC_ONNX_IMAGES: (onnx_gw, "images"),
            SVC_ONNX_TEXTS: (onnx_gw, "texts"),
            SVC_TS_IMAGES: (ts_gw, "images"),
            SVC_TS_TEXTS: (ts_gw, "texts"),
        }
        for r in range(args.rounds):
            shift = (r * 3) % len(POINTS)
            order = list(POINTS[shift:] + POINTS[:shift])
            this = Round(order)
            for point in order:
                if point in local:
                    result = timed_loop(
                        local[point], label=point, batch=BATCH, seconds=args.seconds
                    )
                    value = result.items_per_s
                else:
                    gateway, kind = services[point]
                    value = asyncio.run(
                        service_point(gateway.target, kind, jpegs, counter, args.seconds)
                    )
                this.items_per_s[point] = value
                print(f"  round {r + 1} {point:<32} {fmt(value):>7} items/s", flush=True)
            rounds.append(this)

    report = render(args, rounds, parity, metadata)
    out = RESULTS_DIR / f"onnx-{args.model}.md"
    out.write_text(report)
    section("summary")
    print(report)
    print(f"wrote {out}")


def ratio_rows(rounds: list[Round]) -> list[list[str]]:
    """One row per ratio: each round's value, the median, the target and its verdict."""
    out = []
    for num, den, target in RATIOS:
        values = [r.items_per_s[num] / r.items_per_s[den] for r in rounds]
        median = statistics.median(values)
        verdict = "–" if target is None else ("met" if median >= target else "missed")
        out.append(
            [
                f"{num} ÷ {den}",
                *(f"{v:.2f}" for v in values),
                f"**{median:.2f}**",
                "–" if target is None else f"≥ {target:.1f}: {verdict}",
            ]
        )
    return out


def render(
    args: argparse.Namespace,
    rounds: list[Round],
    parity: tuple[float, float],
    metadata: ModelMetadata,
) -> str:
    """The Markdown report."""
    round_headers = [f"round {i + 1}" for i in range(len(rounds))]
    throughput = [
        [
            point,
            *(fmt(r.items_per_s[point]) for r in rounds),
            fmt(statistics.median(r.items_per_s[point] for r in rounds)),
        ]
        for point in POINTS
    ]
    lines = [
        f"# onnx flavor vs eager open_clip and the TorchScript flavor: {args.model}",
        "",
        "Made by `python -m bench.onnx "
        f"--model {args.model} --rounds {args.rounds} --seconds {args.seconds:g}`. "
        "Figures, not tests.",
        "",
        md_table(["", ""], machine_info()),
        "",
        f"- weights: random, seed {SEED}; the eager model, `model.onnx` and `model.pt` share "
        f"them (weights hash {metadata.weights_sha256[:12]})",
        f"- onnx flavor vs eager on the bench inputs: max |diff| images {parity[0]:.1e}, "
        f"texts {parity[1]:.1e} (the tests hold every path to 1e-5)",
        f"- threads: {threading_note(args.torch_threads)}; ONNX Runtime intra-op threads "
        f"{args.torch_threads or 'default (one per core)'}",
        "- eager: `encode_image` on pre-decoded, normalized 640×480 photos (224 px) and "
        "`encode_text` on 77-padded captions of the caption mix, batch 32",
        "- forward: the exported file alone on the same uint8 pixels, batch 32",
        "- service: `clipsvc serve` (embedded backend, its own process, no cache, "
        "max batch 32), 32 closed-loop callers, one distinct 640×480 JPEG or one caption "
        "of the mix per call",
        f"- each point {args.seconds:g} s; the order rotates every round",
        "",
        "## Ratios (each divides two points of the same round)",
        "",
        md_table(["ratio", *round_headers, "median", "target (#17)"], ratio_rows(rounds)),
        "",
        "## Items per second",
        "",
        md_table(["point", *round_headers, "median"], throughput),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
