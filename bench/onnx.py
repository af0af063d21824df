"""The onnx flavor (ONNX Runtime) against open_clip's eager model and the TorchScript flavor.

    python -m bench.onnx                 # random ViT-B-32, 3 interleaved rounds, ~5 min
    python -m bench.onnx --rounds 5 --seconds 8

What it measures and how: bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import numpy as np

from bench import harness as h
from bench.captions import mixed_caption
from service.model.metadata import ModelMetadata

BATCH = CONCURRENCY = 32
SEED, POOL = 0, 64
TOWERS = ("clip_image", "clip_text")
EAGER_IMAGES, EAGER_TEXTS = "eager images b32", "eager texts b32 (77-padded)"
ORT_IMAGES, TS_IMAGES = "onnx forward images b32", "torchscript forward images b32"
SVC = {f"service {f} {k} c32": (f, k) for f in ("onnx", "torchscript") for k in ("images", "texts")}
POINTS = (EAGER_IMAGES, EAGER_TEXTS, ORT_IMAGES, TS_IMAGES, *SVC)
#: (numerator, denominator, target or None): each is computed per round, then the median.
RATIOS = (
    ("service onnx images c32", EAGER_IMAGES, 1.2),
    ("service onnx texts c32", EAGER_TEXTS, 1.0),
    ("service torchscript images c32", EAGER_IMAGES, None),
    ("service torchscript texts c32", EAGER_TEXTS, None),
    (ORT_IMAGES, EAGER_IMAGES, None),
    (TS_IMAGES, EAGER_IMAGES, None),
    ("service onnx images c32", "service torchscript images c32", None),
    ("service onnx texts c32", "service torchscript texts c32", None),
)


def seeded_repository(model: str, flavor: str) -> Path:
    """`model` with random weights from seed SEED, exported in `flavor`, cached."""
    import torch

    torch.manual_seed(SEED)
    return h.exported(h.MODELS_DIR / f"{model}-seed{SEED}-{flavor}", model, "none", flavor=flavor)


def local_steps(
    args: argparse.Namespace, onnx_repo: Path, ts_repo: Path, metadata: ModelMetadata,
    jpegs: list[bytes],
):  # fmt: skip
    """The in-process points (eager, ONNX Runtime, TorchScript) and the onnx flavor's parity."""
    import open_clip
    import torch

    from service.model.export import load_open_clip, weights_sha256
    from service.model.onnx_graphs import open_session, run_session

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(SEED)
    clip, _ = load_open_clip(args.model, "none")
    if weights_sha256(clip) != metadata.weights_sha256:
        raise RuntimeError("the eager model's weights differ from the exported ones")
    pixels = h.decoded(jpegs, metadata)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (metadata.mean, metadata.std))
    normalized = (torch.from_numpy(pixels).float() / 255 - mean) / std
    tokens77 = open_clip.get_tokenizer(args.model)([mixed_caption(i) for i in range(POOL)])
    onnx = lambda tower: onnx_repo / tower / "1" / "model.onnx"  # noqa: E731
    sessions = {t: open_session(onnx(t), intra_op_threads=args.torch_threads) for t in TOWERS}
    image_ts = torch.jit.load(str(ts_repo / "clip_image" / "1" / "model.pt")).eval()

    inputs = {
        "clip_image": (metadata.image_input, pixels),
        "clip_text": (metadata.text_input, tokens77.numpy()),
    }
    ort = {
        t: lambda rows, t=t: run_session(sessions[t], inputs[t][0], inputs[t][1][rows])
        for t in TOWERS
    }
    eager = {
        "clip_image": lambda rows: clip.encode_image(normalized[rows], normalize=True),
        "clip_text": lambda rows: clip.encode_text(tokens77[rows], normalize=True),
    }
    with torch.no_grad():
        first = list(range(8))
        parity = tuple(np.abs(eager[t](first).numpy() - ort[t](first)).max() for t in TOWERS)
    print(f"onnx flavor vs eager: images {parity[0]:.2e}, texts {parity[1]:.2e}", flush=True)

    def batch_of(run):
        def step(i: int) -> int:
            with torch.inference_mode():
                run([(i * BATCH + k) % POOL for k in range(BATCH)])
            return BATCH

        return step

    steps = {
        EAGER_IMAGES: batch_of(eager["clip_image"]), EAGER_TEXTS: batch_of(eager["clip_text"]),
        ORT_IMAGES: batch_of(ort["clip_image"]),
        TS_IMAGES: batch_of(lambda rows: image_ts(torch.from_numpy(pixels[rows]))),
    }  # fmt: skip
    return steps, (float(parity[0]), float(parity[1]))


async def run(args: argparse.Namespace) -> int:
    h.section("models")
    onnx_repo, ts_repo = (seeded_repository(args.model, f) for f in ("onnx", "python"))
    metadata = ModelMetadata.load(onnx_repo)
    jpegs = h.photo_pool(POOL)
    steps, parity = local_steps(args, onnx_repo, ts_repo, metadata, jpegs)
    settings = dict(local_cache_items=0, max_batch_size=BATCH, torch_threads=args.torch_threads)
    counter = itertools.count(10_000_000)
    h.section(f"{args.rounds} interleaved rounds, {args.seconds:.0f} s per point")
    with (
        h.gateway(onnx_repo, "onnx", **settings) as onnx_gw,
        h.gateway(ts_repo, "torchscript", **settings) as ts_gw,
    ):
        gateways = {"onnx": onnx_gw, "torchscript": ts_gw}

        async def point(n: int, name: str) -> float:
            if name in steps:
                result = await h.timed_loop(steps[name], label=name, seconds=args.seconds)
            else:
                flavor, kind = SVC[name]
                async with h.channel(gateways[flavor].target) as channel:
                    call = h.grpc_calls(h.RawClip(channel), jpegs, mixed_caption)[kind[:-1]]
                    result = await h.closed_loop(
                        call, label=name, concurrency=CONCURRENCY, seconds=args.seconds,
                        min_calls=2 * CONCURRENCY, counter=counter,
                    )  # fmt: skip
            if result.errors:
                raise RuntimeError(f"errors: {result.error_text}")
            print(f"  round {n} {name:<32} {h.fmt(result.items_per_s):>7} items/s", flush=True)
            return result.items_per_s

        rounds = await h.interleaved(args.rounds, POINTS, point, step=3)
    heads = [f"round {i + 1}" for i in range(len(rounds))]
    ratio_rows = []
    for num, den, target in RATIOS:
        values = [r[num] / r[den] for r in rounds]
        median = statistics.median(values)
        verdict = f"≥ {target:.1f}: {'met' if median >= target else 'missed'}" if target else "–"
        cells = [*(f"{v:.2f}" for v in values), f"**{median:.2f}**", verdict]
        ratio_rows.append([f"{num} ÷ {den}", *cells])
    rates = [
        [p, *(h.fmt(r[p]) for r in rounds), h.fmt(statistics.median(r[p] for r in rounds))]
        for p in POINTS
    ]
    report = "\n".join([
        f"# onnx flavor vs eager open_clip and the TorchScript flavor: {args.model}", "",
        f"Made by `python -m bench.onnx --model {args.model} --rounds {args.rounds} --seconds "
        f"{args.seconds:g}`. Figures, not tests.", "",
        h.md_table(["", ""], h.machine_info(args.torch_threads)), "",
        f"- weights: random, seed {SEED}; the eager model, `model.onnx` and `model.pt` share "
        f"them (weights hash {metadata.weights_sha256[:12]})",
        f"- onnx flavor vs eager on the bench inputs: max |diff| images {parity[0]:.1e}, "
        f"texts {parity[1]:.1e} (the tests hold every path to 1e-5)",
        f"- ONNX Runtime intra-op threads {args.torch_threads or 'default (one per core)'}",
        f"- each point {args.seconds:g} s, the order rotating every round; the points: "
        "bench/README.md (onnx)", "",
        "## Ratios (each divides two points of the same round)", "",
        h.md_table(["ratio", *heads, "median", "target (#17)"], ratio_rows), "",
        "## Items per second", "", h.md_table(["point", *heads, "median"], rates), "",
    ])  # fmt: skip
    h.write_result(args.out or h.RESULTS_DIR / f"onnx-{args.model}.md", report, report)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = h.parser(__doc__.split("\n\n")[0], model=None)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    p.add_argument("--seconds", type=float, default=6.0, help="length of each point")
    p.add_argument("--out", type=Path, help="default bench/results/onnx-<model>.md")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(h.main("bench.onnx", parse_args(), run))
