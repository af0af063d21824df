"""Images/s through one gateway over one and over two local Triton servers (issue 15).

    python -m bench.replicas                               # 32 callers, 3 + 3 rounds of 8 s
    python -m bench.replicas --rounds 2 --seconds 5        # shorter
    python -m bench.replicas --model ViT-B-32 --callers 16

    python -m bench.replicas --scenario foreign    # 3 replicas, one foreign; 32 callers, 60 s
    python -m bench.replicas --scenario drain      # SIGTERM, SIGKILL 1 s later; 16 callers

What it measures and how: bench/README.md.
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

from bench import harness as h
from bench.captions import short_caption
from service.client import AsyncClipClient
from service.model.metadata import IMAGE_MODEL, TEXT_MODEL
from service.processes.gateway import gateway_settings, running_gateway

SERVERS = ("A", "B")
# What Kubernetes does on a rollout with a short grace: SIGTERM, SIGKILL this much later.
KILL_AFTER_TERM_S = 1.0
HEADERS = [
    "round", "path", "images/s", "p50 ms", "p99 ms", "errors", "inferences A", "inferences B",
    "B share", "images per execution", "CPU s A", "CPU s B", "CPU s gateway",
]  # fmt: skip


@dataclass
class Round:
    """One measured round of one path: the callers' result and what each server did."""

    index: int
    path: str  # one, two
    result: h.LoadResult
    inferences: dict[str, int]  # image inferences (items) per server during the round
    executions: dict[str, int]  # ... and executions (batches)
    cpu_s: dict[str, float]  # CPU seconds of each server's process group
    gateway_cpu_s: float

    @property
    def share_b(self) -> float:
        """Share of the round's inferences that server B ran."""
        total = sum(self.inferences.values())
        return self.inferences["B"] / total if total else float("nan")

    def row(self) -> list[object]:
        r, share = self.result, self.share_b
        batch = sum(self.inferences.values()) / max(1, sum(self.executions.values()))
        return [
            self.index, self.path, h.fmt(r.items_per_s), h.fmt(r.percentile_ms(50)),
            h.fmt(r.percentile_ms(99)), r.error_text, self.inferences["A"], self.inferences["B"],
            f"{100 * share:.0f} %" if share == share else "–", h.fmt(batch),
            h.fmt(self.cpu_s["A"]), h.fmt(self.cpu_s["B"]), h.fmt(self.gateway_cpu_s),
        ]  # fmt: skip


class Replicas:
    """Two Tritons, one gateway per path, and the counters read around each round."""

    def __init__(self, servers: dict, gateways: dict, jpegs: list[bytes], args: argparse.Namespace):
        self.servers, self.gateways, self.jpegs, self.args = servers, gateways, jpegs, args
        self.counter = itertools.count()

    def counters(self, path: str) -> tuple[dict, dict, float]:
        stats = {
            n: h.triton_stats(s.grpc_url, [IMAGE_MODEL])[IMAGE_MODEL]
            for n, s in self.servers.items()
        }
        cpu = {n: h.group_total(s.pid, h.cpu_seconds) for n, s in self.servers.items()}
        return stats, cpu, h.group_total(self.gateways[path].pid, h.cpu_seconds)

    async def round(self, index: int, path: str) -> Round:
        """`--callers` closed-loop single-image callers through gateway `path`."""
        marks: list = []
        async with h.channel(self.gateways[path].target) as channel:
            result = await h.closed_loop(
                h.grpc_calls(h.RawClip(channel), self.jpegs)["image"],
                label=f"round {index} {path}", concurrency=self.args.callers,
                seconds=self.args.seconds, min_calls=self.args.callers, counter=self.counter,
                before_measure=lambda: marks.extend(self.counters(path)),
            )  # fmt: skip
        (s0, c0, g0), (s1, c1, g1) = marks, self.counters(path)
        r = Round(
            index, path, result, {s: s1[s][0] - s0[s][0] for s in SERVERS},
            {s: s1[s][1] - s0[s][1] for s in SERVERS}, {s: c1[s] - c0[s] for s in SERVERS},
            g1 - g0,
        )  # fmt: skip
        print("  " + " | ".join(map(str, r.row())), flush=True)
        return r


def paired_ratios(rounds: list[Round]) -> list[float]:
    """two ÷ one of each pair of rounds with the same number."""
    one = {r.index: r.result.items_per_s for r in rounds if r.path == "one"}
    return [
        r.result.items_per_s / one[r.index] for r in rounds if r.path == "two" and one.get(r.index)
    ]


def report(
    rounds: list[Round], args: argparse.Namespace, info: list, urls: dict, note: str
) -> tuple[str, str]:
    """The Markdown report and the summary to print."""
    by = {p: [r for r in rounds if r.path == p] for p in ("one", "two")}
    ratios = paired_ratios(rounds)
    one, two = (statistics.median([r.result.items_per_s for r in by[p]]) for p in ("one", "two"))
    inf_two = {s: sum(r.inferences[s] for r in by["two"]) for s in SERVERS}
    total_two = sum(inf_two.values())
    share_b = inf_two["B"] / total_two if total_two else float("nan")
    images = {p: max(1, sum(r.result.items for r in by[p])) for p in by}
    cpu = {p: sum(sum(r.cpu_s.values()) for r in by[p]) / images[p] for p in by}
    gw_cpu = {p: sum(r.gateway_cpu_s for r in by[p]) / images[p] for p in by}
    batches_two = sum(sum(r.executions.values()) for r in by["two"])
    balance = []
    if total_two > 0 and not 0.25 <= share_b <= 0.75:
        balance = [
            f"**The split is lopsided** ({inf_two['A']} / {inf_two['B']}). The gateway sends one "
            f"Triton request per batch: the `two` rounds held only {batches_two} batches (images "
            f"per execution {h.fmt(total_two / max(1, batches_two))}). Per-call round robin "
            "balances many small calls, not a slow stream of large batches.",
            "",
        ]
    ms = {
        p: f"{1000 * cpu['one']:.1f} / {1000 * cpu['two']:.1f}"
        for p, cpu in (("t", cpu), ("g", gw_cpu))
    }
    rows = [
        ["images/s, one server (median)", h.fmt(one)],
        ["images/s, two servers (median)", h.fmt(two)],
        ["two ÷ one, median of the paired rounds",
         f"{statistics.median(ratios):.2f}×" if ratios else "–"],
        ["two ÷ one, paired rounds (min–max)",
         f"{min(ratios):.2f}–{max(ratios):.2f}×" if ratios else "–"],
        ["two ÷ one, ratio of the medians", f"{two / one:.2f}×" if one else "–"],
        ["inferences in the `two` rounds, A / B",
         f"{inf_two['A']} / {inf_two['B']} (B {100 * share_b:.0f} %)"],
        ["inferences B ran during the `one` rounds (should be 0)",
         str(sum(r.inferences["B"] for r in by["one"]))],
        ["Triton CPU ms per image, one / two (both servers' groups)", ms["t"]],
        ["gateway CPU ms per image, one / two", ms["g"]],
        ["caller errors, all rounds", str(sum(sum(r.result.errors.values()) for r in rounds))],
    ]  # fmt: skip
    summary = h.md_table(["figure", "value"], rows)
    what_ran = [
        f"- Two real `tritonserver`s (pip wheel, python backend, CPU) on the same repository: "
        f"A at `{urls['A']}`, B at `{urls['B']}`. Gateway `one`: `--triton-url {urls['A']}`; "
        f"gateway `two`: `--triton-url ipv4:{urls['A']},{urls['B']}` (round robin per call); "
        f"both in their own processes, cache off, `--max-inflight-batches {args.inflight}`.",
        f"- {args.callers} closed-loop callers, one image per EmbedImage call ({note}, every "
        f"image's bytes new); {args.rounds} rounds of each path, interleaved (the order rotates "
        f"each round), each ≥ {args.seconds:g} s after one unmeasured call per caller and one "
        "unmeasured warm-up point per gateway. Inferences and executions: the change of the "
        "image model's Triton statistics over the round; CPU: user + system time of each "
        "server's process group (tritonserver and its python stubs).",
    ]
    reading = [
        *balance,
        f"This machine has {info[1][1]}: both servers, both gateways and the load generator "
        "share them, so a second Triton adds no compute. Two ÷ one shows what spreading the "
        "batches over two processes costs (or gains by overlap), and the split shows whether "
        "the round robin reaches both; it is not a speed-up figure (`bench/gpu.sh` measures "
        f"one server per GPU machine). CPU per image in the `two` rounds: "
        f"{1000 * gw_cpu['two']:.1f} ms in the gateway, {1000 * cpu['two']:.1f} ms in both "
        "Tritons.",
    ]
    title = f"One against two local Triton servers behind one gateway ({args.model})"
    sections = {"What ran": what_ran, "Summary": summary}
    sections |= {
        "Rounds": h.md_table(HEADERS, [r.row() for r in rounds]),
        "How to read it": reading,
    }
    return h.report(title, info, sections), summary


def tritons(stack: contextlib.ExitStack, repos: dict[str, Path], threads: int) -> dict[str, Any]:
    """A real tritonserver per name, each on its repository (TORCH_THREADS applied)."""
    servers = {}
    for name, repository in repos.items():
        started = time.perf_counter()
        servers[name] = stack.enter_context(h.triton(repository, torch_threads=threads))
        took = time.perf_counter() - started
        print(f"  tritonserver {name}: {servers[name].grpc_url}, ready in {took:.1f} s")
    return servers


def triton_gateway(
    stack: contextlib.ExitStack, repository: Path, name: str, urls: Sequence[str],
    args: argparse.Namespace, **settings: object,
) -> Any:  # fmt: skip
    """A gateway (own process, no cache) over `urls`: one address, or `ipv4:` round robin."""
    target = urls[0] if len(urls) == 1 else "ipv4:" + ",".join(urls)
    settings = {"local_cache_items": 0, "redis_url": "", **settings}
    gateway = stack.enter_context(
        h.gateway(
            repository, name, backend="triton", triton_url=target, torch_threads=args.torch_threads,
            max_inflight_batches=args.inflight, **settings,
        )
    )  # fmt: skip
    print(f"  gateway {name}: {gateway.target} → {target}", flush=True)
    return gateway


async def run(args: argparse.Namespace) -> int:
    h.section(f"replicas: {args.model}, one against two tritonservers")
    info = h.machine_info(args.torch_threads)
    repository = h.model_repository(args.model)
    jpegs = h.photo_pool(64, seed=3)
    with contextlib.ExitStack() as stack:
        h.section("starting two tritonservers and two gateways")
        servers = tritons(stack, dict.fromkeys(SERVERS, repository), args.torch_threads)
        urls = {name: server.grpc_url for name, server in servers.items()}
        gateways = {
            path: triton_gateway(stack, repository, f"gateway-{path}", replicas, args)
            for path, replicas in (("one", [urls["A"]]), ("two", [urls["A"], urls["B"]]))
        }
        bench = Replicas(servers, gateways, jpegs, args)
        h.section("warm-up point per gateway (not reported)")
        for path in gateways:
            await bench.round(0, path)
        h.section(f"{args.rounds} interleaved rounds of each path")
        by_round = await h.interleaved(args.rounds, ["one", "two"], bench.round)
        rounds = [r for each in by_round for r in each.values()]
        for path, gw in gateways.items():
            if not gw.running:
                print(f"  WARNING: gateway {path} died during the run", flush=True)
    text, summary = report(rounds, args, info, urls, h.photo_note(jpegs))
    h.write_result(args.out, text, summary)
    return 0


# ---------------------------------------------------------------------- scenario: foreign
def other_export(model: str) -> Path:
    """The same architecture with random weights (seeded): another model id and hash."""
    import torch

    from service.model.export import export_model
    from service.settings import BatchingOptions

    target = Path(tempfile.mkdtemp(prefix="bench-rep-foreign-")) / "repo"
    torch.manual_seed(2525)
    export_model(model, "none", target, flavor="python", batching=BatchingOptions(), progress=False)
    return target


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


def inference_counts(server: Any) -> dict[str, int]:
    """`inference_count` of both models of `server`."""
    stats = h.triton_stats(server.grpc_url, [IMAGE_MODEL, TEXT_MODEL])
    return {model: counts[0] for model, counts in stats.items()}


async def run_foreign(args: argparse.Namespace) -> int:
    h.section(f"replicas, foreign: {args.model}, three tritonservers, one of another export")
    info = h.machine_info(args.torch_threads)
    repository = h.model_repository(args.model)
    theirs = other_export(args.model)
    jpegs = h.photo_pool(16, (160, 120), seed=5)
    answered: dict[str, np.ndarray] = {}
    image_vectors: list[np.ndarray] = []
    calls = {"text": 0, "image": 0}
    with contextlib.ExitStack() as stack:
        repos = {"A": repository, "F": theirs, "A2": repository}
        servers = tritons(stack, repos, args.torch_threads)
        redis = stack.enter_context(h.redis())
        urls = [servers[n].grpc_url for n in ("A", "F", "A2")]
        gateway = triton_gateway(
            stack, repository, "gateway-foreign", urls, args, redis_url=redis.url
        )
        target = "ipv4:" + ",".join(urls)
        before = {name: inference_counts(server) for name, server in servers.items()}
        h.section(f"{args.callers} callers for {args.seconds:g} s")
        async with AsyncClipClient(gateway.target) as client:

            async def call(i: int) -> int:
                """EmbedText (a new text) and EmbedImage (new bytes) in turn."""
                kind = "text" if i % 2 else "image"
                calls[kind] += 1
                try:
                    if kind == "text":
                        text = f"{short_caption(i)} #{i}"
                        answered[text] = (await client.embed_text([text])).vectors[0]
                    else:
                        image = h.unique_jpeg(jpegs[i % len(jpegs)], i)
                        image_vectors.append((await client.embed_image([image])).vectors[0])
                except grpc.aio.AioRpcError as exc:
                    raise h.CallFailed(f"{kind} {exc.code().name}") from exc
                return 1

            result = await h.closed_loop(
                call, label="foreign", concurrency=args.callers, seconds=args.seconds,
                warmup_rounds=0,
            )  # fmt: skip
        errors = result.errors
        after = {name: inference_counts(server) for name, server in servers.items()}
        import redis as redis_py

        raw = redis_py.Redis.from_url(redis.url)
        stored = [raw.get(key) for key in raw.scan_iter("clip:*:emb:*")]
    h.section("checking every answered text against both exports' own vectors")
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
    summary = h.md_table(["figure", "value"], rows)
    what_ran = [
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
    ]
    result_lines = [
        summary,
        "",
        "F's configs are read (once a second, by the probes), its vectors never asked "
        "for: the gateway sends inference only to replicas whose identity it checked on "
        "their own connection. The issue's run of the code before this change answered "
        "96 of 950 calls with F's vectors.",
    ]
    if len(stored) < len(known):
        result_lines += [
            "",
            f"Redis holds {len(stored)} of the {len(known)} vectors answered: a write the cache "
            "gives up on (it never fails a call) is not retried. Every entry it does hold is "
            "one that was answered, none is F's.",
        ]
    title = f"Three Triton replicas, one serving another export ({args.model})"
    text = h.report(title, info, {"What ran": what_ran, "Result": result_lines})
    h.write_result(args.out or h.RESULTS_DIR / "replicas-foreign.md", text, summary)
    return 0


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
    h.section(f"replicas, drain: {args.model}, SIGTERM then SIGKILL of one of two tritonservers")
    info = h.machine_info(args.torch_threads)
    repository = h.model_repository(args.model)
    jpegs = h.photo_pool(16, (160, 120), seed=7)
    cycles: list[Cycle] = []
    with contextlib.ExitStack() as stack:
        servers = tritons(stack, dict.fromkeys(SERVERS, repository), args.torch_threads)
        a = servers["A"]
        urls = [servers["A"].grpc_url, servers["B"].grpc_url]
        gateway = triton_gateway(stack, repository, "gateway-drain", urls, args)
        target = "ipv4:" + ",".join(urls)
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
                    image = h.unique_jpeg(jpegs[n % len(jpegs)], index * 1_000_000 + n)
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
                    served = h.triton_stats(a.grpc_url, [IMAGE_MODEL])[IMAGE_MODEL][0]
                    while served == 0 and time.monotonic() - back < 120:
                        await asyncio.sleep(0.1)
                        served = h.triton_stats(a.grpc_url, [IMAGE_MODEL])[IMAGE_MODEL][0]
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
    headers = ["cycle", "calls before", "calls SIGTERM→restart", "calls after", "caller errors"]
    table = h.md_table([*headers, "rejoin s"], rows)
    worst = max((c.rejoin_s for c in cycles), default=0)
    summary = h.md_table(
        ["figure", "value"],
        [
            ["cycles (SIGTERM, SIGKILL 1 s later, restart)", str(len(cycles))],
            ["callers", str(args.callers)],
            ["caller errors, all cycles", str(total_errors)],
            ["rejoin after restart, worst", f"{worst:.1f} s"],
        ],
    )
    what_ran = [
        "- Two real `tritonserver`s A and B on the same export; one gateway (own "
        f"process) with `--triton-url {target}`, cache off, "
        f"`--max-inflight-batches {args.inflight}`.",
        f"- {args.callers} closed-loop callers, one new image per EmbedImage call.",
        f"- Each cycle: {args.settle_s:g} s of load; SIGTERM to A's tritonserver (only "
        "that process, as the kubelet signals a container's PID 1); SIGKILL of A's "
        f"process group {KILL_AFTER_TERM_S:g} s later; {args.settle_s:g} s on B alone; A "
        "restarted on the same ports; the time until A's image model runs an "
        f"inference again; {args.settle_s:g} s more.",
    ]
    before = "The issue's run of the code before this change: 233 calls failed with "
    before += "UNAVAILABLE in 8 s of the same drain under 16 callers."
    title = f"A Triton replica drained under load ({args.model})"
    text = h.report(
        title, info, {"What ran": what_ran, "Summary": summary, "Cycles": [table, "", before]}
    )
    h.write_result(args.out or h.RESULTS_DIR / "replicas-drain.md", text, summary)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = h.parser(__doc__)
    p.add_argument(
        "--scenario", default="balance", choices=("balance", "foreign", "drain"),
        help="balance: one against two servers; foreign: 3 replicas, one of another "
        "export; drain: SIGTERM, SIGKILL 1 s later, restart, under load",
    )  # fmt: skip
    p.add_argument("--callers", type=int, help="concurrent callers (32; the drain scenario: 16)")
    p.add_argument("--seconds", type=float, help="seconds per round (8; the foreign scenario: 60)")
    p.add_argument("--cycles", type=int, default=3, help="drain: cycles")
    p.add_argument("--settle-s", type=float, default=5.0, help="drain: seconds of load per step")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each path")
    p.add_argument("--inflight", type=int, default=2, help="--max-inflight-batches of the gateways")
    p.add_argument("--out", type=Path, help="the report (bench/results/replicas*.md)")
    args = p.parse_args(argv)
    args.callers = args.callers or (16 if args.scenario == "drain" else 32)
    args.seconds = args.seconds or (60.0 if args.scenario == "foreign" else 8.0)
    if args.scenario == "balance" and args.out is None:
        args.out = h.RESULTS_DIR / "replicas.md"
    if not 1 <= args.callers <= 256 or not 1 <= args.rounds <= 20 or not 0 < args.seconds <= 600:
        p.error("--callers must be 1..256, --rounds 1..20 and --seconds in (0, 600]")
    return args


async def dispatch(args: argparse.Namespace) -> int:
    """The scenario asked for."""
    return await {"balance": run, "foreign": run_foreign, "drain": run_drain}[args.scenario](args)


if __name__ == "__main__":
    sys.exit(h.main("bench.replicas", parse_args(), dispatch))
