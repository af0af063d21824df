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

Two more scenarios check what a gateway promises about its replicas (issue 25):

    python -m bench.replicas --scenario foreign    # 3 replicas, one foreign; 32 callers, 60 s
    python -m bench.replicas --scenario drain      # SIGTERM, SIGKILL 1 s later; 16 callers

`foreign`: A and A2 serve the export the gateway has, F serves another export of the
same architecture (random weights: another model id and weights hash); one gateway with
`--triton-url ipv4:A,F,A2` and a real redis-server. Closed-loop callers alternate
EmbedText (a new text each call) and EmbedImage (new bytes each call). Every text vector
answered is compared with both exports' own vectors for that text (embedded gateways of
X and of F's export compute them afterwards), every value left in Redis with the vectors
answered, and F's inference counts (Triton's statistics) are read. Writes
bench/results/replicas-foreign.md.

`drain`: A and B serve the same export; a gateway with `--triton-url ipv4:A,B` (cache
off) under closed-loop single-image callers. Each cycle sends A's tritonserver SIGTERM
(what the kubelet sends), SIGKILL one second later, waits, restarts A on the same ports
and measures how long until A runs inferences again. Caller errors are counted per
phase. Writes bench/results/replicas-drain.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
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
    unique_jpeg,
    write_result,
)
from bench.load import cpu_seconds
from service.client import AsyncClipClient
from service.model.metadata import IMAGE_MODEL, TEXT_MODEL
from service.processes.child_server import group_members
from service.processes.gateway import GatewayProcess, gateway_settings, running_gateway
from service.processes.redis_server import RedisServer
from service.processes.triton_server import TritonProcess

PHOTO_SIZE = (640, 480)
SERVERS = ("A", "B")
# What Kubernetes does on a rollout with a short grace: SIGTERM, SIGKILL this much later.
KILL_AFTER_TERM_S = 1.0


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


# ---------------------------------------------------------------------- scenario: foreign
def other_export(model: str, torch_threads: int) -> Path:
    """The same architecture with random weights (seeded): another model id and hash."""
    import torch

    from service.model.export import export_model
    from service.settings import BatchingOptions

    target = Path(tempfile.mkdtemp(prefix="bench-rep-foreign-")) / "repo"
    torch.manual_seed(2525)
    export_model(model, "none", target, flavor="python", batching=BatchingOptions(), progress=False)
    return repository_variant(target, torch_threads)


async def reference_texts(repository: Path, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """What an embedded gateway of `repository` answers for each text (no cache)."""
    settings = gateway_settings(repository, local_cache_items=0)
    out: dict[str, np.ndarray] = {}
    async with running_gateway(settings) as gw, AsyncClipClient(f"127.0.0.1:{gw.port}") as client:
        for start in range(0, len(texts), 32):
            chunk = list(texts[start : start + 32])
            answer = await client.embed_text(chunk)
            out.update(zip(chunk, answer.vectors, strict=True))
    return out


def inference_counts(server: TritonProcess) -> dict[str, int]:
    """`inference_count` of both models of `server`."""
    stats = triton_batching(server.grpc_url, [IMAGE_MODEL, TEXT_MODEL])
    return {model: counts[0] for model, counts in stats.items()}


async def run_foreign(args: argparse.Namespace) -> int:
    section(f"replicas, foreign: {args.model}, three tritonservers, one of another export")
    info = machine_info()
    info.append(("threads", threading_note(args.torch_threads)))
    repository = model_repository(args.model)
    ours = repository_variant(repository, args.torch_threads)
    theirs = other_export(args.model, args.torch_threads)
    jpegs = photo_pool(16, (160, 120), seed=5)
    answered: dict[str, np.ndarray] = {}
    image_vectors: list[np.ndarray] = []
    errors: dict[str, int] = {}
    calls = {"text": 0, "image": 0}
    with contextlib.ExitStack() as stack:
        servers: dict[str, TritonProcess] = {}
        for name, repo in (("A", ours), ("F", theirs), ("A2", ours)):
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rep-")))
            servers[name] = stack.enter_context(
                TritonProcess(repo, workdir=workdir, startup_timeout_s=300)
            )
            print(f"  tritonserver {name}: {servers[name].grpc_url}", flush=True)
        redis = stack.enter_context(RedisServer())
        target = "ipv4:" + ",".join(servers[n].grpc_url for n in ("A", "F", "A2"))
        gateway = stack.enter_context(
            GatewayProcess(
                repository,
                log_name="gateway-foreign",
                backend="triton",
                triton_url=target,
                redis_url=redis.url,
                local_cache_items=0,
                max_inflight_batches=args.inflight,
                torch_threads=args.torch_threads,
            )
        )
        print(f"  gateway: {gateway.target} → {target}", flush=True)
        before = {name: inference_counts(server) for name, server in servers.items()}
        section(f"{args.callers} callers for {args.seconds:g} s")
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + args.seconds
        async with AsyncClipClient(gateway.target) as client:

            async def caller(index: int) -> None:
                n = 0
                while loop.time() < stop_at:
                    n += 1
                    kind = "text" if n % 2 else "image"
                    try:
                        if kind == "text":
                            text = f"{short_caption(index * 100_000 + n)} #{index}-{n}"
                            answer = await client.embed_text([text])
                            answered[text] = answer.vectors[0]
                        else:
                            image = unique_jpeg(jpegs[n % len(jpegs)], index * 100_000 + n)
                            answer = await client.embed_image([image])
                            image_vectors.append(answer.vectors[0])
                    except grpc.aio.AioRpcError as exc:
                        key = f"{kind} {exc.code().name}"
                        errors[key] = errors.get(key, 0) + 1
                    calls[kind] += 1

            await asyncio.gather(*(caller(i) for i in range(args.callers)))
        after = {name: inference_counts(server) for name, server in servers.items()}
        raw = redis_client(redis.url)
        stored = [raw.get(key) for key in raw.scan_iter("clip:*:emb:*")]
    section("checking every answered text against both exports' own vectors")
    texts = sorted(answered)
    want_ours = await reference_texts(repository, texts)
    want_theirs = await reference_texts(theirs, texts)
    outcome = {"ours": 0, "foreign": 0, "neither": 0}
    for text in texts:
        got = answered[text]
        if np.abs(got - want_ours[text]).max() < 1e-5:
            outcome["ours"] += 1
        elif np.abs(got - want_theirs[text]).max() < 1e-5:
            outcome["foreign"] += 1
        else:
            outcome["neither"] += 1
    known = np.stack([*answered.values(), *image_vectors]) if answered else np.zeros((0, 1))
    foreign_known = np.stack(list(want_theirs.values())) if want_theirs else np.zeros((0, 1))
    cached = {"answered vectors": 0, "foreign": 0, "other": 0}
    for value in stored:
        vector = np.frombuffer(value[1:], dtype="<f4") if value else np.zeros(0)
        if len(known) and np.abs(known - vector).max(axis=1).min() < 1e-6:
            if len(foreign_known) and np.abs(foreign_known - vector).max(axis=1).min() < 1e-5:
                cached["foreign"] += 1
            else:
                cached["answered vectors"] += 1
        else:
            cached["other"] += 1
    ran = {name: {m: after[name][m] - before[name][m] for m in after[name]} for name in servers}
    rows = [
        ["callers, seconds", f"{args.callers}, {args.seconds:g}"],
        ["calls: EmbedText / EmbedImage", f"{calls['text']} / {calls['image']}"],
        ["caller errors", ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0"],
        [
            "text vectors answered: ours / foreign / neither",
            f"{outcome['ours']} / {outcome['foreign']} / {outcome['neither']}",
        ],
        [
            "Redis entries: answered vectors / foreign / other",
            f"{cached['answered vectors']} / {cached['foreign']} / {cached['other']}",
        ],
        *[
            [
                f"inferences {name} ran (image, text)",
                f"{ran[name][IMAGE_MODEL]}, {ran[name][TEXT_MODEL]}",
            ]
            for name in servers
        ],
    ]
    summary = md_table(["figure", "value"], rows)
    text = "\n".join(
        [
            f"# Three Triton replicas, one serving another export ({args.model})",
            "",
            md_table(["", ""], info),
            "",
            "## What ran",
            "",
            "- Three real `tritonserver`s: A and A2 on the export the gateway has, F on "
            "another export of the same architecture (random weights, so another model id "
            "and weights hash in its configs).",
            f"- One gateway (own process) with `--triton-url {target}` (F in the middle of "
            f"the list), a real redis-server, no in-process cache, "
            f"`--max-inflight-batches {args.inflight}`.",
            f"- {args.callers} closed-loop callers for {args.seconds:g} s, each alternating "
            "EmbedText (a new text each call) and EmbedImage (new JPEG bytes each call).",
            "- Afterwards every answered text vector is compared (1e-5) with what embedded "
            "gateways of both exports answer for that text; every value in Redis with the "
            "vectors answered and with F's export's text vectors; inferences per server are "
            "the change of Triton's `inference_count` per model.",
            "",
            "## Result",
            "",
            summary,
            "",
            "F's configs are read (once a second, by the probes), its vectors never asked "
            "for: the gateway sends inference only to replicas whose identity it checked on "
            "their own connection. The issue's run of the code before this change answered "
            "96 of 950 calls with F's vectors.",
            "",
            *(
                [
                    f"Redis holds {len(stored)} of the {len(known)} vectors answered: a write "
                    "the cache gives up on (it never fails a call) is not retried. Every "
                    "entry it does hold is one that was answered, none is F's.",
                    "",
                ]
                if len(stored) < len(known)
                else []
            ),
        ]
    )
    write_result(args.out or RESULTS_DIR / "replicas-foreign.md", text, summary)
    return 0


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


# ---------------------------------------------------------------------- scenario: drain
@dataclass
class Cycle:
    """One SIGTERM → SIGKILL → restart of replica A under load."""

    index: int
    #: Caller errors (by code) and calls per phase: before, drain (SIGTERM to restart),
    #: after (restart onwards).
    errors: dict[str, dict[str, int]]
    calls: dict[str, int]
    #: Seconds from A's restart (ready) to its first inference.
    rejoin_s: float


async def run_drain(args: argparse.Namespace) -> int:
    section(f"replicas, drain: {args.model}, SIGTERM then SIGKILL of one of two tritonservers")
    info = machine_info()
    info.append(("threads", threading_note(args.torch_threads)))
    repository = model_repository(args.model)
    triton_repository = repository_variant(repository, args.torch_threads)
    jpegs = photo_pool(16, (160, 120), seed=7)
    cycles: list[Cycle] = []
    with contextlib.ExitStack() as stack:
        servers: dict[str, TritonProcess] = {}
        for name in SERVERS:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rep-")))
            servers[name] = stack.enter_context(
                TritonProcess(triton_repository, workdir=workdir, startup_timeout_s=300)
            )
        a = servers["A"]
        target = f"ipv4:{servers['A'].grpc_url},{servers['B'].grpc_url}"
        gateway = stack.enter_context(
            GatewayProcess(
                repository,
                log_name="gateway-drain",
                backend="triton",
                triton_url=target,
                local_cache_items=0,
                redis_url="",
                max_inflight_batches=args.inflight,
                torch_threads=args.torch_threads,
            )
        )
        print(f"  gateway: {gateway.target} → {target}", flush=True)
        phase = {"now": "before"}
        errors: dict[str, dict[str, int]] = {}
        calls: dict[str, int] = {}
        stop = asyncio.Event()
        async with AsyncClipClient(gateway.target) as client:

            async def caller(index: int) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    current = phase["now"]
                    image = unique_jpeg(jpegs[n % len(jpegs)], index * 1_000_000 + n)
                    try:
                        await client.embed_image([image])
                    except grpc.aio.AioRpcError as exc:
                        by_code = errors.setdefault(current, {})
                        by_code[exc.code().name] = by_code.get(exc.code().name, 0) + 1
                    calls[current] = calls.get(current, 0) + 1

            workers = [asyncio.create_task(caller(i)) for i in range(args.callers)]
            try:
                for index in range(1, args.cycles + 1):
                    errors.clear()
                    calls.clear()
                    phase["now"] = "before"
                    await asyncio.sleep(args.settle_s)
                    phase["now"] = "drain"
                    a.send_signal(signal.SIGTERM, group=False)
                    await asyncio.sleep(KILL_AFTER_TERM_S)
                    await asyncio.to_thread(a.kill)
                    await asyncio.sleep(args.settle_s)
                    await asyncio.to_thread(a.start)
                    phase["now"] = "after"
                    back = time.monotonic()
                    served = triton_batching(a.grpc_url, [IMAGE_MODEL])[IMAGE_MODEL][0]
                    while served == 0 and time.monotonic() - back < 120:
                        await asyncio.sleep(0.1)
                        served = triton_batching(a.grpc_url, [IMAGE_MODEL])[IMAGE_MODEL][0]
                    rejoin = time.monotonic() - back if served else float("inf")
                    await asyncio.sleep(args.settle_s)
                    cycles.append(
                        Cycle(index, {k: dict(v) for k, v in errors.items()}, dict(calls), rejoin)
                    )
                    print(
                        f"  cycle {index}: calls {calls}, errors {errors or 0}, "
                        f"A rejoined {rejoin:.1f} s after its restart",
                        flush=True,
                    )
            finally:
                stop.set()
                await asyncio.gather(*workers)
    total_errors = sum(sum(v.values()) for c in cycles for v in c.errors.values())
    rows = [
        [
            c.index,
            c.calls.get("before", 0),
            c.calls.get("drain", 0),
            c.calls.get("after", 0),
            ", ".join(f"{p} {code}: {n}" for p, v in c.errors.items() for code, n in v.items())
            or "0",
            f"{c.rejoin_s:.1f}",
        ]
        for c in cycles
    ]
    table = md_table(
        [
            "cycle",
            "calls before",
            "calls SIGTERM→restart",
            "calls after",
            "caller errors",
            "rejoin s",
        ],
        rows,
    )
    summary = md_table(
        ["figure", "value"],
        [
            ["cycles (SIGTERM, SIGKILL 1 s later, restart)", str(len(cycles))],
            ["callers", str(args.callers)],
            ["caller errors, all cycles", str(total_errors)],
            [
                "rejoin after restart, worst",
                f"{max((c.rejoin_s for c in cycles), default=0):.1f} s",
            ],
        ],
    )
    text = "\n".join(
        [
            f"# A Triton replica drained under load ({args.model})",
            "",
            md_table(["", ""], info),
            "",
            "## What ran",
            "",
            "- Two real `tritonserver`s A and B on the same export; one gateway (own "
            f"process) with `--triton-url {target}`, cache off, "
            f"`--max-inflight-batches {args.inflight}`.",
            f"- {args.callers} closed-loop callers, one new image per EmbedImage call.",
            f"- Each cycle: {args.settle_s:g} s of load; SIGTERM to A's tritonserver (only "
            "that process, as the kubelet signals a container's PID 1); SIGKILL of A's "
            f"process group {KILL_AFTER_TERM_S:g} s later; {args.settle_s:g} s on B alone; A "
            "restarted on the same ports; the time until A's image model runs an "
            f"inference again; {args.settle_s:g} s more.",
            "",
            "## Summary",
            "",
            summary,
            "",
            "## Cycles",
            "",
            table,
            "",
            "The issue's run of the code before this change: 233 calls failed with "
            "UNAVAILABLE in 8 s of the same drain under 16 callers.",
            "",
        ]
    )
    write_result(args.out or RESULTS_DIR / "replicas-drain.md", text, summary)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenario", default="balance", choices=("balance", "foreign", "drain"),
        help="balance: one against two servers; foreign: 3 replicas, one of another "
        "export; drain: SIGTERM, SIGKILL 1 s later, restart, under load",
    )  # fmt: skip
    parser.add_argument("--model", default=DEMO_MODEL, choices=(DEMO_MODEL, "ViT-B-32"))
    parser.add_argument(
        "--callers", type=int, help="concurrent callers (32; the drain scenario: 16)"
    )
    parser.add_argument(
        "--seconds", type=float, help="seconds per round (8; the foreign scenario: 60)"
    )
    parser.add_argument("--cycles", type=int, default=3, help="drain: cycles")
    parser.add_argument(
        "--settle-s", type=float, default=5.0, help="drain: seconds of load between steps"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each path")
    parser.add_argument(
        "--inflight", type=int, default=2, help="--max-inflight-batches of both gateways"
    )
    parser.add_argument("--out", type=Path, help="the report (bench/results/replicas*.md)")
    add_threading_arguments(parser)
    args = parser.parse_args(argv)
    if args.callers is None:
        args.callers = 16 if args.scenario == "drain" else 32
    if args.seconds is None:
        args.seconds = 60.0 if args.scenario == "foreign" else 8.0
    if args.scenario == "balance" and args.out is None:
        args.out = RESULTS_DIR / "replicas.md"
    if not 1 <= args.callers <= 256:
        parser.error("--callers must be 1..256")
    if not 1 <= args.rounds <= 20 or not 0 < args.seconds <= 600:
        parser.error("--rounds must be 1..20 and --seconds in (0, 600]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    scenarios = {"balance": run, "foreign": run_foreign, "drain": run_drain}

    async def dispatch(args: argparse.Namespace) -> int:
        return await scenarios[args.scenario](args)

    return run_benchmark(argv, parse_args, dispatch, "bench.replicas")


if __name__ == "__main__":
    sys.exit(main())
