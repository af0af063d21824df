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
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench import harness as h
from bench.harness import REPO_ROOT as ROOT
from service.processes.gateway import GatewayProcess
from service.processes.metric_samples import sample, scrape

HEADERS = [
    "code", "idle p50 ms", "idle p99 ms", "loaded p50 ms", "loaded p99 ms", "loaded ÷ idle p99",
    "bulk images/s while loaded",
]  # fmt: skip


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


def embedded_images(gateway: GatewayProcess) -> dict[str, float]:
    """Images embedded so far (no cache here: each one a forward pass)."""
    samples = scrape(gateway.metrics_port)
    return {"images": sample(samples, "clip_items_embedded_total", modality="image")}


async def interactive(
    gateway: GatewayProcess, pool: list[bytes], seconds: float, tag: int
) -> h.LoadResult:
    """One caller, one single-image EmbedImage at a time for `seconds`; `counters`: the
    images embedded meanwhile, bulk ones included."""
    async with h.channel(gateway.target) as channel:
        calls = h.grpc_calls(h.RawClip(channel), pool, pick=lambda i: tag * 1_000_000 + i)
        return await h.closed_loop(
            calls["image"], label=f"interactive {tag}", concurrency=1, seconds=seconds,
            warmup_rounds=0, counters=lambda: embedded_images(gateway),
        )  # fmt: skip


async def phase(
    gateway: GatewayProcess, pool: list[bytes], folder: Path, args: argparse.Namespace, tag: int
) -> dict[str, float]:
    """An idle and a loaded measurement on `gateway`: p50/p99 (ms) and bulk images/s."""
    idle = await interactive(gateway, pool, args.seconds, tag)
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
        loaded = await interactive(gateway, pool, args.seconds, tag + 1)
        assert bulk.returncode is None, "the embed-dir run ended early: raise --bulk-images"
    finally:
        if bulk.returncode is None:
            bulk.terminate()
        await asyncio.wait_for(bulk.wait(), 30)
    bulk_per_s = (loaded.counters["images"] - loaded.items) / loaded.seconds
    runs = {"idle": idle, "loaded": loaded}
    figures = {f"{k}_p{q}": r.percentile_ms(q) for k, r in runs.items() for q in (50, 99)}
    calls = {f"{k}_calls": len(r.latencies_s) for k, r in runs.items()}
    return figures | calls | {"bulk_per_s": bulk_per_s}


async def run(args: argparse.Namespace) -> int:
    """Start both gateways, run the interleaved rounds, write the table."""
    repository = h.model_repository(h.DEMO_MODEL)
    pool = h.photo_pool(32, seed=5)
    with tempfile.TemporaryDirectory(prefix="bench-lanes-") as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp) / "images"
        folder.mkdir()
        # Distinct files; their bytes repeat (hard links), which costs the same work with
        # no cache, and keeps the set-up short.
        distinct = h.photo_pool(200, seed=6)
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
            name: stack.enter_context(CodeGateway(code, repository, **settings))
            for name, code in variants.items()
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for k, (name, gateway) in enumerate(gateways.items()):
                results[name].append(await phase(gateway, pool, folder, args, 10 * (2 * r + k)))
                print(f"round {r + 1} {name}: {per_round(results[name][-1])}", flush=True)
    write(results, args)
    return 0


def per_round(figures: dict[str, float]) -> str:
    """`key value, ...` of one round."""
    return ", ".join(f"{key} {value:.1f}" for key, value in figures.items())


def write(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    """The Markdown table: medians over rounds per variant, and the loaded ÷ idle ratio."""
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rows = []
    for name, rounds in results.items():
        med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        figures = [med[k] for k in ("idle_p50", "idle_p99", "loaded_p50", "loaded_p99")]
        ratio = med["loaded_p99"] / med["idle_p99"]
        rows.append(
            [name, *(f"{v:.0f}" for v in figures), f"{ratio:.2f}", f"{med['bulk_per_s']:.1f}"]
        )
    text = "\n".join([
        "# Priority lanes: interactive p99 while embed-dir saturates the gateway", "",
        f"`python -m bench.lanes --baseline-ref {args.baseline_ref} --rounds {args.rounds} "
        f"--seconds {args.seconds}` at {commit}, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} "
        f"UTC; {os.cpu_count()} CPUs (shared). Embedded demo model, no cache, 640×480 JPEGs; one "
        "interactive caller (single images, one at a time); bulk = `clipsvc embed-dir` "
        "(EmbedStream). Medians over rounds, variants interleaved.", "",
        h.md_table(HEADERS, rows), "", "Per round:", "",
        *(f"- {name}, round {i}: {per_round(r)}" for name, rr in results.items()
          for i, r in enumerate(rr, 1)),
    ])  # fmt: skip
    h.write_result(args.out, text + "\n", text)


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
