"""Priority lanes: interactive single-image p99, idle and while an `embed-dir` run saturates
the gateway, on the baseline code (`--baseline-ref`, e.g. main before lanes) and on this
checkout, interleaved in one run.

    python -m bench.lanes                      # ~4 min on 2 cores (--rounds 2 --seconds 15)
    python -m bench.lanes --baseline-ref HEAD~3 --rounds 3

What it measures and how: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import grpc

from bench import harness as h
from bench.harness import REPO_ROOT as ROOT
from bench.harness import model_repository, photo_pool, unique_jpeg
from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.processes.gateway import GatewayProcess
from service.processes.metric_samples import sample, scrape


class CodeGateway(GatewayProcess):
    """A gateway run from another copy of the code (`code`: the folder holding `service`)."""

    def __init__(self, code: Path, repository: Path, **settings: object) -> None:
        super().__init__(repository, log_name=f"gateway-{code.name}", **settings)
        self.code = code

    def cwd(self) -> Path:
        """Run `-m service.cli` from `code`."""
        return self.code

    def environment(self) -> dict[str, str]:
        """The usual environment, with `code` first on the import path."""
        return {**super().environment(), "PYTHONPATH": str(self.code)}


def checkout(ref: str, into: Path) -> Path:
    """`ref`'s tree (git archive) in `into`; returns it."""
    git = ["git", "archive", "--format=tar", ref]
    archive = subprocess.run(git, cwd=ROOT, check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


async def interactive(target: str, pool: list[bytes], seconds: float, tag: int) -> list[float]:
    """One caller, one single-image EmbedImage at a time for `seconds`: latencies in s."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = clip_pb2_grpc.ClipServiceStub(channel)
        end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < end:
            image = unique_jpeg(pool[i % len(pool)], tag * 1_000_000 + i)
            started = time.perf_counter()
            await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[image]), timeout=120)
            latencies.append(time.perf_counter() - started)
            i += 1
    return latencies


def embedded_images(gateway: GatewayProcess) -> float:
    """Images embedded so far (cache hits included; there is no cache here)."""
    return sample(scrape(gateway.metrics_port), "clip_items_embedded_total", modality="image")


async def phase(
    gateway: GatewayProcess, pool: list[bytes], folder: Path, args: argparse.Namespace, tag: int
) -> dict[str, float]:
    """An idle and a loaded measurement on `gateway`: p50/p99 (ms) and bulk images/s."""
    idle = await interactive(gateway.target, pool, args.seconds, tag)
    out = folder.parent / f"out-{tag}.npy"
    bulk = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "service.cli", "embed-dir", str(folder), "--out", str(out)],
        *["--target", gateway.target],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        await asyncio.sleep(args.warm_s)
        before, started = embedded_images(gateway), time.perf_counter()
        loaded = await interactive(gateway.target, pool, args.seconds, tag + 1)
        bulk_items = embedded_images(gateway) - before - len(loaded)
        bulk_rate = bulk_items / (time.perf_counter() - started)
        assert bulk.returncode is None, "the embed-dir run ended early: raise --bulk-images"
    finally:
        if bulk.returncode is None:
            bulk.terminate()
        await asyncio.wait_for(bulk.wait(), 30)

    phases = {"idle": idle, "loaded": loaded}
    figures = {f"{k}_p{q}": h.percentile_ms(v, q) for k, v in phases.items() for q in (50, 99)}
    return figures | {"idle_calls": len(idle), "loaded_calls": len(loaded), "bulk_per_s": bulk_rate}


async def run(args: argparse.Namespace) -> int:
    """Start both gateways, run the interleaved rounds, write the table."""
    repository = model_repository("clip-demo-shapes")
    pool = photo_pool(32, (640, 480), seed=5)
    with tempfile.TemporaryDirectory(prefix="bench-lanes-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        # Distinct files; their bytes repeat (hard links), which costs the same work with
        # no cache, and keeps the set-up short.
        distinct = photo_pool(200, (640, 480), seed=6)
        for i, jpeg in enumerate(distinct):
            (folder / f"src-{i:05d}.jpg").write_bytes(jpeg)
        for i in range(len(distinct), args.bulk_images):
            os.link(folder / f"src-{i % len(distinct):05d}.jpg", folder / f"{i:05d}.jpg")
        variants = {
            f"baseline ({args.baseline_ref})": checkout(args.baseline_ref, Path(tmp) / "base"),
            "this checkout": ROOT,
        }
        settings = {"local_cache_items": 0, "max_queued_items": 4096}
        gateways = {
            name: CodeGateway(code, repository, **settings) for name, code in variants.items()
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        try:
            for gateway in gateways.values():
                gateway.start()
            for r in range(args.rounds):
                for k, (name, gateway) in enumerate(gateways.items()):
                    figures = await phase(gateway, pool, folder, args, tag=10 * (2 * r + k))
                    results[name].append(figures)
                    print(f"round {r + 1} {name}: {per_round(figures)}", flush=True)
        finally:
            for gateway in gateways.values():
                gateway.close()
    write(results, args)
    return 0


def per_round(figures: dict[str, float]) -> str:
    """`key value, ...` of one round."""
    return ", ".join(f"{key} {value:.1f}" for key, value in figures.items())


def write(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    """The Markdown table: medians over rounds per variant, and the loaded ÷ idle ratio."""
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        "# Priority lanes: interactive p99 while embed-dir saturates the gateway",
        "",
        f"`python -m bench.lanes --baseline-ref {args.baseline_ref} --rounds {args.rounds} "
        f"--seconds {args.seconds}` at {commit}, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} "
        f"UTC; {os.cpu_count()} CPUs (shared). Embedded demo model, no cache, 640×480 JPEGs; one "
        "interactive caller (single images, one at a time); bulk = `clipsvc embed-dir` "
        "(EmbedStream). Medians over rounds, variants interleaved.",
        "",
        "| code | idle p50 ms | idle p99 ms | loaded p50 ms | loaded p99 ms | loaded ÷ idle p99 "
        "| bulk images/s while loaded |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rounds in results.items():
        med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        lines.append(
            f"| {name} | {med['idle_p50']:.0f} | {med['idle_p99']:.0f} | {med['loaded_p50']:.0f} "
            f"| {med['loaded_p99']:.0f} | {med['loaded_p99'] / med['idle_p99']:.2f} "
            f"| {med['bulk_per_s']:.1f} |"
        )
    lines += ["", "Per round:", ""]
    for name, rounds in results.items():
        for i, r in enumerate(rounds):
            lines.append(f"- {name}, round {i + 1}: {per_round(r)}")
    h.write_result(args.out, "\n".join(lines) + "\n", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run."""
    parser = h.parser(__doc__, out="lanes.md", model=None, threads=False)
    parser.add_argument("--baseline-ref", default="main", help="git ref of the baseline code")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    parser.add_argument("--warm-s", type=float, default=3.0, help="bulk head start")
    parser.add_argument("--bulk-images", type=int, default=8000, help="files in the folder")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
