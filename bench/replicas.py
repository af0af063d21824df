"""Images/s through one gateway over one and over two local Triton servers (issue 15).

    python -m bench.replicas                               # 32 callers, 3 + 3 rounds of 8 s
    python -m bench.replicas --rounds 2 --seconds 5        # shorter
    python -m bench.replicas --model ViT-B-32 --callers 16

Starts two real `tritonserver`s (A and B, each on its own gRPC, HTTP and metrics ports)
on the same exported repository and two gateways in their own processes: `one` with
`--triton-url 127.0.0.1:A`, `two` with `--triton-url ipv4:127.0.0.1:A,127.0.0.1:B`
(round robin per call). Both gateways are alive for the whole run and have the same
settings (cache off, `--max-inflight-batches 2` so that two batches can be in Triton at
once). The same closed-loop single-image EmbedImage callers then run through them in
interleaved rounds, one, two, one, two, ..., so that both see the same machine. Reports
images/s per round, the medians, the ratio two ÷ one (the median of the paired rounds'
ratios, and the ratio of the medians), and how the inferences split between A and B
(Triton's model statistics, `inference_count` of the image model, read around each
round), with the CPU seconds each server's process group used.

On a machine with few cores both servers share the same cores: the figure shows that
the calls are balanced and what balancing costs, not a speed-up. Writes
bench/results/replicas.md (`--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from tqdm import tqdm

from bench.common import (
    DEMO_MODEL,
    RESULTS_DIR,
    LoadResult,
    RawClip,
    add_threading_arguments,
    channel_options,
    closed_loop,
    fmt,
    machine_info,
    md_table,
    model_repository,
    photo_pool,
    repository_variant,
    run_benchmark,
    section,
    short_caption,
    single_item_calls,
    threading_note,
    triton_batching,
    write_result,
)
from bench.load import cpu_seconds
from service.model.metadata import IMAGE_MODEL
from service.processes.child_server import group_members
from service.processes.gateway import GatewayProcess
from service.processes.triton_server import TritonProcess

PHOTO_SIZE = (640, 480)
SERVERS = ("A", "B")


@dataclass
class Round:
    """One measured round of one path."""

    index: int
    path: str  # one, two
    result: LoadResult
    #: Image inferences (items) and executions (batches) each server ran during the round.
    inferences: dict[str, int]
    executions: dict[str, int]
    #: CPU seconds each server's process group (tritonserver + python stubs) used.
    cpu_s: dict[str, float]
    #: CPU seconds the gateway of the round used (decode, gRPC, queue).
    gateway_cpu_s: float

    @property
    def share_b(self) -> float:
        """Share of the round's inferences that server B ran."""
        total = sum(self.inferences.values())
        return self.inferences["B"] / total if total else float("nan")

    @property
    def mean_batch(self) -> float:
        """Images per Triton execution, both servers together."""
        runs = sum(self.executions.values())
        return sum(self.inferences.values()) / runs if runs else float("nan")


def group_cpu_seconds(pgid: int | None) -> float:
    """User + system CPU seconds of the live members of a process group."""
    if pgid is None:
        return 0.0
    total = 0.0
    for pid in group_members(pgid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(pid)
    return total


class Counters:
    """Reads the image model's statistics and the CPU time of both servers."""

    def __init__(self, servers: dict[str, TritonProcess]) -> None:
        self.servers = servers

    def read(self) -> tuple[dict[str, tuple[int, int]], dict[str, float]]:
        """((inference_count, execution_count), CPU seconds) per server."""
        stats = {
            name: triton_batching(server.grpc_url, [IMAGE_MODEL])[IMAGE_MODEL]
            for name, server in self.servers.items()
        }
        cpu = {name: group_cpu_seconds(server.pid) for name, server in self.servers.items()}
        return stats, cpu


async def measure_round(
    index: int,
    path: str,
    target: str,
    jpegs: Sequence[bytes],
    counters: Counters,
    args: argparse.Namespace,
    counter: itertools.count[int],
    gateway_pid: int | None,
) -> Round:
    """`args.callers` closed-loop callers through the gateway at `target` for one round."""
    marks: dict[str, object] = {}

    def mark() -> None:
        marks["stats"], marks["cpu"] = counters.read()
        marks["gateway"] = group_cpu_seconds(gateway_pid)

    async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
        result = await closed_loop(
            single_item_calls(RawClip(channel), jpegs, short_caption)["image"],
            label=f"round {index} {path}",
            concurrency=args.callers,
            seconds=args.seconds,
            min_calls=args.callers,
            counter=counter,
            before_measure=mark,
        )
    stats, cpu = counters.read()
    gateway_cpu = group_cpu_seconds(gateway_pid) - marks["gateway"]  # type: ignore[operator]
    before_stats: dict[str, tuple[int, int]] = marks["stats"]  # type: ignore[assignment]
    before_cpu: dict[str, float] = marks["cpu"]  # type: ignore[assignment]
    return Round(
        index,
        path,
        result,
        inferences={s: stats[s][0] - before_stats[s][0] for s in SERVERS},
        executions={s: stats[s][1] - before_stats[s][1] for s in SERVERS},
        cpu_s={s: cpu[s] - before_cpu[s] for s in SERVERS},
        gateway_cpu_s=gateway_cpu,
    )


def paired_ratios(rounds: Sequence[Round]) -> list[float]:
    """two ÷ one of each pair of consecutive rounds (round n of each path)."""
    ones = [r for r in rounds if r.path == "one"]
    twos = [r for r in rounds if r.path == "two"]
    return [
        t.result.items_per_s / o.result.items_per_s
        for o, t in zip(ones, twos, strict=False)
        if o.result.items_per_s
    ]


def median_rate(rounds: Sequence[Round], path: str) -> float:
    """Median images/s of the rounds of `path`."""
    rates = [r.result.items_per_s for r in rounds if r.path == path]
    return statistics.median(rates) if rates else float("nan")


def report(
    rounds: Sequence[Round],
    args: argparse.Namespace,
    info: list[tuple[str, str]],
    urls: dict[str, str],
    image_note: str,
) -> tuple[str, str]:
    """The Markdown report and the summary to print."""
    ratios = paired_ratios(rounds)
    one, two = median_rate(rounds, "one"), median_rate(rounds, "two")
    two_rounds = [r for r in rounds if r.path == "two"]
    inferences_two = {s: sum(r.inferences[s] for r in two_rounds) for s in SERVERS}
    total_two = sum(inferences_two.values())
    share_b = inferences_two["B"] / total_two if total_two else float("nan")
    leaked = sum(r.inferences["B"] for r in rounds if r.path == "one")
    images = {p: max(1, sum(r.result.items for r in rounds if r.path == p)) for p in ("one", "two")}
    cpu = {
        p: sum(sum(r.cpu_s.values()) for r in rounds if r.path == p) / images[p]
        for p in ("one", "two")
    }
    gateway_cpu = {
        p: sum(r.gateway_cpu_s for r in rounds if r.path == p) / images[p] for p in ("one", "two")
    }
    errors = sum(sum(r.result.errors.values()) for r in rounds)
    batches_two = sum(sum(r.executions.values()) for r in two_rounds)
    lopsided = total_two > 0 and not 0.25 <= share_b <= 0.75
    balance_note = (
        [
            f"**The split is lopsided** ({inferences_two['A']} / {inferences_two['B']}). The "
            f"gateway sends one Triton request per batch: the `two` rounds held only "
            f"{batches_two} batches (images per execution {fmt(total_two / max(1, batches_two))}"
            "). Its health check (once a second: server and model readiness, and the model "
            "configs, through the same channel as the inference calls) takes round-robin "
            "picks between them, so which server gets the next batch depends on how many "
            "probe calls fell in between; at a steady batch period the batches can keep "
            "landing on one server. Per-call round robin balances many small calls (the "
            "demo model, a few images an execution), not a slow stream of large batches. "
            "Probing on a channel of its own, or choosing the replica per batch, would.",
            "",
        ]
        if lopsided
        else []
    )
    ratio_median = statistics.median(ratios) if ratios else float("nan")
    summary_rows = [
        ["images/s, one server (median)", fmt(one)],
        ["images/s, two servers (median)", fmt(two)],
        ["two ÷ one, median of the paired rounds", f"{ratio_median:.2f}×"],
        ["two ÷ one, paired rounds (min–max)", f"{min(ratios):.2f}–{max(ratios):.2f}×"]
        if ratios
        else ["two ÷ one, paired rounds", "–"],
        ["two ÷ one, ratio of the medians", f"{two / one:.2f}×" if one else "–"],
        [
            "inferences in the `two` rounds, A / B",
            f"{inferences_two['A']} / {inferences_two['B']} (B {100 * share_b:.0f} %)",
        ],
        ["inferences B ran during the `one` rounds (should be 0)", str(leaked)],
        [
            "Triton CPU ms per image, one / two (both servers' groups)",
            f"{1000 * cpu['one']:.1f} / {1000 * cpu['two']:.1f}",
        ],
        [
            "gateway CPU ms per image, one / two",
            f"{1000 * gateway_cpu['one']:.1f} / {1000 * gateway_cpu['two']:.1f}",
        ],
        ["caller errors, all rounds", str(errors)],
    ]
    summary = md_table(["figure", "value"], summary_rows)
    cores = info[1][1]
    parts = [
        f"# One against two local Triton servers behind one gateway ({args.model})",
        "",
        md_table(["", ""], info),
        "",
        "## What ran",
        "",
        f"- Two real `tritonserver`s (the pip wheel, python backend, CPU) on the same "
        f"exported repository: A at `{urls['A']}`, B at `{urls['B']}`, each with its own "
        "gRPC, HTTP and metrics ports.",
        f"- Gateway `one`: `--backend triton --triton-url {urls['A']}`. Gateway `two`: "
        f"`--triton-url ipv4:{urls['A']},{urls['B']}` (round robin per call). Both in their "
        f"own processes, cache off, `--max-inflight-batches {args.inflight}` (so that two "
        "batches can be in Triton at once: with the default 1 the gateway sends one batch "
        "at a time and a second server could never run beside the first).",
        f"- {args.callers} closed-loop callers, each sending one image per EmbedImage call "
        f"and the next as soon as its answer came back; {image_note}; every image's bytes "
        "are new (a JPEG comment), so no cache or single-flight answers for Triton.",
        f"- Rounds interleaved one, two, one, two, ... ({args.rounds} of each), each "
        f"≥ {args.seconds:g} s after one unmeasured call per caller, after one unmeasured "
        f"warm-up point per gateway. Inferences and executions per server are the change of "
        "the image model's `inference_count` and `execution_count` (Triton's statistics "
        "API) over the round; CPU is the change of the user + system time of each server's "
        "process group (tritonserver and its python stubs).",
        "",
        "## Summary",
        "",
        summary,
        "",
        "## Rounds",
        "",
        md_table(
            [
                "round",
                "path",
                "images/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "inferences A",
                "inferences B",
                "B share",
                "images per execution",
                "CPU s A",
                "CPU s B",
                "CPU s gateway",
            ],
            [
                [
                    r.index,
                    r.path,
                    fmt(r.result.items_per_s),
                    fmt(r.result.percentile_ms(50)),
                    fmt(r.result.percentile_ms(99)),
                    r.result.error_text,
                    r.inferences["A"],
                    r.inferences["B"],
                    f"{100 * r.share_b:.0f} %" if r.share_b == r.share_b else "–",
                    fmt(r.mean_batch),
                    fmt(r.cpu_s["A"]),
                    fmt(r.cpu_s["B"]),
                    fmt(r.gateway_cpu_s),
                ]
                for r in rounds
            ],
        ),
        "",
        "## How to read it",
        "",
        *balance_note,
        f"This machine has {cores}. Both servers, both gateways and the load generator share "
        "them, so a second Triton adds no compute: what the ratio two ÷ one shows is the "
        "cost (or the small gain from overlapping one server's gRPC and copies with the "
        "other's forward pass) of spreading the batches over two processes, and the split "
        "shows whether the round robin reaches both servers. It is not a speed-up figure. On "
        "a machine where each server has its own GPU (or its own cores), the same split is "
        "what lets two servers do twice the work; measure that there (`bench/gpu.sh` "
        "runs one server per GPU machine).",
        "",
        f"Where the CPU went, per image in the `two` rounds: {1000 * gateway_cpu['two']:.1f} ms "
        f"in the gateway (JPEG decode, resize, gRPC, queue) and {1000 * cpu['two']:.1f} ms in "
        "both Triton servers together (python stub, forward pass). Whichever is larger bounds "
        "images/s on shared cores; a second server splits only the Triton share, and only "
        "helps where it brings its own device.",
        "",
    ]
    return "\n".join(parts), summary


async def run(args: argparse.Namespace) -> int:
    section(f"replicas: {args.model}, one against two tritonservers")
    info = machine_info()
    info.append(("threads", threading_note(args.torch_threads)))
    for key, value in info:
        print(f"  {key}: {value}")
    repository = model_repository(args.model)
    triton_repository = repository_variant(repository, args.torch_threads)
    jpegs = photo_pool(64, PHOTO_SIZE, seed=3)
    kib = sum(len(j) for j in jpegs) / len(jpegs) / 1024
    image_note = f"{PHOTO_SIZE[0]}×{PHOTO_SIZE[1]} JPEG photos (mean {kib:.0f} KiB)"
    settings: dict[str, object] = {
        "backend": "triton",
        "local_cache_items": 0,
        "redis_url": "",
        "max_inflight_batches": args.inflight,
        "torch_threads": args.torch_threads,
    }
    with contextlib.ExitStack() as stack:
        section("starting two tritonservers and two gateways")
        servers: dict[str, TritonProcess] = {}
        for name in SERVERS:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rep-")))
            started = time.perf_counter()
            servers[name] = stack.enter_context(
                TritonProcess(triton_repository, workdir=workdir, startup_timeout_s=300)
            )
            print(
                f"  tritonserver {name}: {servers[name].grpc_url} (http "
                f"{servers[name].ports.http}, metrics {servers[name].ports.metrics}), "
                f"ready in {time.perf_counter() - started:.1f} s",
                flush=True,
            )
        urls = {name: server.grpc_url for name, server in servers.items()}
        targets = {"one": urls["A"], "two": f"ipv4:{urls['A']},{urls['B']}"}
        gateways = {}
        for path, url in targets.items():
            gateways[path] = stack.enter_context(
                GatewayProcess(repository, log_name=f"gateway-{path}", triton_url=url, **settings)
            )
            print(f"  gateway {path}: {gateways[path].target} → {url}", flush=True)
        counters = Counters(servers)
        counter = itertools.count()

        section("warm-up point per gateway (not reported)")
        for path, gateway in gateways.items():
            warm = await measure_round(
                0, path, gateway.target, jpegs, counters, args, counter, gateway.pid
            )
            print(
                f"  {path}: {fmt(warm.result.items_per_s)} images/s, "
                f"A {warm.inferences['A']} / B {warm.inferences['B']} inferences",
                flush=True,
            )

        section(f"{args.rounds} interleaved rounds of each: one, two, one, two, ...")
        rounds: list[Round] = []
        order = [(n, path) for n in range(1, args.rounds + 1) for path in ("one", "two")]
        for n, path in tqdm(order, desc="rounds", unit="round", disable=None):
            gateway = gateways[path]
            r = await measure_round(
                n, path, gateway.target, jpegs, counters, args, counter, gateway.pid
            )
            rounds.append(r)
            tqdm.write(
                f"  round {n} {path}: {fmt(r.result.items_per_s)} images/s, "
                f"p50 {fmt(r.result.percentile_ms(50))} ms, "
                f"p99 {fmt(r.result.percentile_ms(99))} ms, errors {r.result.error_text}, "
                f"inferences A {r.inferences['A']} / B {r.inferences['B']}, "
                f"CPU s A {r.cpu_s['A']:.1f} / B {r.cpu_s['B']:.1f} / gateway {r.gateway_cpu_s:.1f}"
            )
        for path, gateway in gateways.items():
            if not gateway.running:
                print(f"  WARNING: gateway {path} died during the run", flush=True)
    text, summary = report(rounds, args, info, urls, image_note)
    write_result(args.out, text, summary)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEMO_MODEL, choices=(DEMO_MODEL, "ViT-B-32"))
    parser.add_argument("--callers", type=int, default=32, help="concurrent image callers")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each path")
    parser.add_argument(
        "--inflight", type=int, default=2, help="--max-inflight-batches of both gateways"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "replicas.md")
    add_threading_arguments(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.callers <= 256:
        parser.error("--callers must be 1..256")
    if not 1 <= args.rounds <= 20 or not 0 < args.seconds <= 120:
        parser.error("--rounds must be 1..20 and --seconds in (0, 120]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(argv, parse_args, run, "bench.replicas")


if __name__ == "__main__":
    sys.exit(main())
