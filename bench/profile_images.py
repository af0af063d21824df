"""Where the time goes on the image path with 32 concurrent single-image callers.

    python -m bench.profile_images --model ViT-B-32 --seconds 30

What it measures and how: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench import harness as h
from service.processes.metric_samples import scrape

STAGES = (
    ("clip_request_duration_seconds", "whole EmbedImage call, in the gateway"),
    ("clip_preprocess_duration_seconds", "decode + resize + crop of one image"),
    ("clip_queue_wait_seconds", "one item waiting in the batching queue"),
    ("clip_backend_duration_seconds", "one forward pass (a batch), on the model thread"),
    ("clip_batch_size", "items per forward pass (not seconds)"),
)


# ---------------------------------------------------------------------------- the callers
async def drive(target: str, concurrency: int, seconds: float) -> None:
    """Child process: single-image callers; prints START after warm-up, then a JSON result."""
    jpegs = h.photo_pool(64, seed=3)
    async with h.channel(target) as channel:
        r = await h.closed_loop(
            h.grpc_calls(h.RawClip(channel), jpegs)["image"], label=f"images c{concurrency}",
            concurrency=concurrency, seconds=seconds, min_calls=2 * concurrency, progress=False,
            before_measure=lambda: print("START", flush=True),
        )  # fmt: skip
    summary = {"items_per_s": r.items_per_s, "errors": dict(r.errors)}
    summary |= {"p50_ms": r.percentile_ms(50), "p99_ms": r.percentile_ms(99)}
    print("RESULT " + json.dumps(summary), flush=True)


# ---------------------------------------------------------------------------- threads
def thread_cpu() -> dict[int, tuple[str, float]]:
    """{tid: (name, CPU seconds)} for every thread of this process."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    out: dict[int, tuple[str, float]] = {}
    for entry in os.scandir("/proc/self/task"):
        tid = int(entry.name)
        try:
            seconds = h.cpu_seconds(f"self/task/{tid}")
            with open(f"/proc/self/task/{tid}/comm") as comm:
                native = comm.read().strip()
        except OSError:
            continue
        out[tid] = (names.get(tid) or f"native:{native}", seconds)
    return out


def group_of(name: str) -> str:
    """Which part of the gateway a thread belongs to."""
    if name == "MainThread":
        return "event loop (grpc.aio, protobuf, hashing, asyncio)"
    if name.startswith("model"):
        return "model thread (forward pass, calling thread)"
    if name.startswith("decode"):
        return "decode pool (PIL decode, resize, crop)"
    if name == "native:python":
        # Threads started by native code inherit the process name: here torch's OpenMP
        # workers (gRPC names its own, e.g. 'event_engine').
        return "native threads named 'python' (torch's OpenMP workers: forward pass)"
    if name.startswith("native:"):
        return f"native thread '{name[7:]}'"
    return f"python thread '{name.rstrip('0123456789_-')}'"


# ---------------------------------------------------------------------------- timeline
class Timeline:
    """Wall time of a few gateway methods per call (the waits between the stages the
    histograms time), wrapped on the live objects; a renamed method is skipped."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.batches: list[int] = []
        self.recording = False

    def wrap(self, owner: object, name: str, label: str | None) -> None:
        """Time `owner.name` under `label`; None: keep the size of each batch it runs."""
        original = getattr(owner, name, None)
        if original is None:
            return
        if label:
            self.seconds[label] = []

        async def timed(*args: object, **kwargs: object) -> object:
            started = time.perf_counter()
            if label is None and self.recording:
                self.batches.append(len(args[0]))  # type: ignore[arg-type]
            try:
                return await original(*args, **kwargs)
            finally:
                if self.recording and label:
                    self.seconds[label].append(time.perf_counter() - started)

        setattr(owner, name, timed)


# ---------------------------------------------------------------------------- main
async def profile(args: argparse.Namespace) -> int:
    from pyinstrument import Profiler

    from service.processes.gateway import gateway_settings, running_gateway

    h.section(f"profile: {args.model}, {args.concurrency} concurrent single-image callers")
    info = h.machine_info(args.torch_threads)
    repository = h.model_repository(args.model)
    settings = gateway_settings(
        repository, local_cache_items=0, redis_url="", torch_threads=args.torch_threads,
        log_level="WARNING",
    )  # fmt: skip
    async with running_gateway(settings) as gateway:
        target = f"127.0.0.1:{gateway.port}"
        timeline = Timeline()
        embedder = gateway.embedder
        timeline.wrap(embedder, "embed_images", "Embedder.embed_images: all of one call's work")
        decode = "decode step, waiting for a decode thread included"
        timeline.wrap(embedder, "_prepare_images", decode)
        queue = getattr(embedder._backend, "_queue", None)
        timeline.wrap(queue, "submit", "batching queue: waiting for the batch ahead + own forward")
        timeline.wrap(queue, "_run", None)
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.profile_images", "--drive", target,
            "--concurrency", str(args.concurrency), "--seconds", str(args.seconds),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert child.stdout is not None
        profiler = Profiler(interval=0.001, async_mode="disabled")
        before_cpu, before_metrics, started, summary = {}, {}, 0.0, {}
        print("  callers warming up ...", flush=True)
        while line := (await child.stdout.readline()).decode():
            if line.startswith("START"):
                print(f"  measuring for ≥ {args.seconds:g} s ...", flush=True)
                before_metrics = scrape(gateway.metrics_port or 0)
                before_cpu = thread_cpu()
                started = time.perf_counter()
                timeline.recording = True
                profiler.start()
            elif line.startswith("RESULT"):
                summary = json.loads(line.split(" ", 1)[1])
        if profiler.is_running:
            profiler.stop()
        timeline.recording = False
        wall = time.perf_counter() - started
        after_cpu = thread_cpu()
        after_metrics = scrape(gateway.metrics_port or 0)
        await child.wait()

    groups: dict[str, float] = {}
    for tid, (name, seconds) in after_cpu.items():
        spent = seconds - before_cpu.get(tid, (name, 0.0))[1]
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + spent
    total_cpu = sum(groups.values())
    cpu_rows = [
        [group, f"{spent:.1f}", f"{spent / wall:.2f}", f"{100 * spent / total_cpu:.0f} %"]
        for group, spent in sorted(groups.items(), key=lambda kv: -kv[1])
        if spent >= 0.05
    ]
    stage_rows = []
    for metric, meaning in STAGES:
        for labels, mean in sorted(histogram_means(before_metrics, after_metrics, metric).items()):
            if "EmbedImage" in labels or "image" in labels:
                unit = mean if metric == "clip_batch_size" else mean * 1000
                stage_rows.append([f"`{metric}{labels}`", meaning, h.fmt(unit)])
    out = args.results_dir / f"profile-images-{args.model}{'-' + args.tag if args.tag else ''}"
    text_profile = profiler.output_text(unicode=True, color=False, show_all=False)
    got = lambda key: h.fmt(float(summary.get(key, float("nan"))))  # type: ignore[arg-type]  # noqa: E731
    timeline_rows = [
        [label, str(len(v)), h.fmt(1000 * sum(v) / len(v)) if v else "–"]
        for label, v in timeline.seconds.items()
    ]
    batches = ", ".join(str(n) for n in timeline.batches[:40]) or "–"
    html = f", `{out.with_suffix('.html').name}`" if args.html else ""
    text = h.report(
        f"Profile: {args.model}, {args.concurrency} concurrent single-image callers", info, {
            f"CPU by gateway thread ({wall:.1f} s of wall time, {total_cpu:.1f} CPU s)":
                h.md_table(["threads", "CPU s", "cores", "share"], cpu_rows),
            "Stage means (gateway histograms, this window)":
                h.md_table(["series", "what", "mean (ms; batch: items)"], stage_rows),
            "Per-call timeline (wrapped gateway methods, this window)": [
                h.md_table(["step", "calls", "mean ms"], timeline_rows), "",
                f"Batch sizes in the order the queue ran them (first 40): {batches}."],
            "Event-loop thread (pyinstrument)": [
                f"Full tree: `{out.with_suffix('.txt').name}`{html}.", "",
                "```", "\n".join(text_profile.splitlines()[:80]), "```"],
        },
        intro=f"In-process embedded gateway, cache off (bench/README.md). Callers: "
        f"{got('items_per_s')} images/s, p50 {got('p50_ms')} ms, p99 {got('p99_ms')} ms, errors "
        f"{summary.get('errors', {})} (the profiler slows the event loop somewhat).",
    )  # fmt: skip
    h.write_result(
        out.with_suffix(".md"), text, text.split("\n## ", 1)[1].split("## Event-loop")[0]
    )
    out.with_suffix(".txt").write_text(text_profile)
    if args.html:
        out.with_suffix(".html").write_text(profiler.output_html())
    return 0


def histogram_means(
    before: dict[str, float], after: dict[str, float], name: str
) -> dict[str, float]:
    """Mean of each labelled series of histogram `name` between two scrapes."""
    means: dict[str, float] = {}
    for key, total in after.items():
        if key.startswith(name + "_sum{"):
            count = f"{name}_count{key[len(name) + 4 :]}"
            if (n := after.get(count, 0.0) - before.get(count, 0.0)) > 0:
                means[key[len(name) + 4 :]] = (total - before.get(key, 0.0)) / n
    return means


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = h.parser(__doc__, model="ViT-B-32")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--html", action="store_true", help="also write pyinstrument's HTML")
    p.add_argument("--results-dir", type=Path, default=h.RESULTS_DIR)
    p.add_argument("--drive", metavar="TARGET", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.drive:
        asyncio.run(drive(args.drive, args.concurrency, args.seconds))
        return 0
    return h.main("bench.profile_images", args, profile)


if __name__ == "__main__":
    sys.exit(main())
