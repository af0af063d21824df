"""Images/s through one gateway over one and over two local Triton servers (issue 15).

    python -m bench.replicas                               # 32 callers, 3 + 3 rounds of 8 s
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
from collections import Counter
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
KEYS = ("inferences", "executions", "cpu")  # the counters read per server, in `Round`'s order
KILL_AFTER_TERM_S = 1.0  # Kubernetes on a rollout with a short grace: SIGTERM, then SIGKILL
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

    def row(self) -> list[object]:
        r, total = self.result, sum(self.inferences.values())
        share = f"{100 * self.inferences['B'] / total:.0f} %" if total else "–"
        batch = total / max(1, sum(self.executions.values()))
        return [
            self.index, self.path, h.fmt(r.items_per_s), h.fmt(r.percentile_ms(50)),
            h.fmt(r.percentile_ms(99)), r.error_text, self.inferences["A"], self.inferences["B"],
            share, h.fmt(batch), h.fmt(self.cpu_s["A"]), h.fmt(self.cpu_s["B"]),
            h.fmt(self.gateway_cpu_s),
        ]  # fmt: skip


def paired_ratios(rounds: list[Round]) -> list[float]:
    """two ÷ one of each pair of rounds with the same number."""
    one = {r.index: r.result.items_per_s for r in rounds if r.path == "one"}
    return [
        r.result.items_per_s / one[r.index] for r in rounds if r.path == "two" and one.get(r.index)
    ]


def summary_rows(rounds: list[Round]) -> list[list[str]]:
    """The balance scenario's figures: medians, two ÷ one, the split, CPU per image."""
    by = {p: [r for r in rounds if r.path == p] for p in ("one", "two")}
    ratios = paired_ratios(rounds)
    one, two = (statistics.median([r.result.items_per_s for r in by[p]]) for p in by)
    inf = {s: sum(r.inferences[s] for r in by["two"]) for s in SERVERS}
    share_b = inf["B"] / sum(inf.values()) if sum(inf.values()) else float("nan")

    def per_image(cpu: Any) -> str:  # CPU ms per image, one / two
        ms = [1000 * sum(map(cpu, by[p])) / max(1, sum(r.result.items for r in by[p])) for p in by]
        return " / ".join(f"{v:.1f}" for v in ms)

    return [
        ["images/s, one server (median)", h.fmt(one)],
        ["images/s, two servers (median)", h.fmt(two)],
        ["two ÷ one, median of the paired rounds",
         f"{statistics.median(ratios):.2f}×" if ratios else "–"],
        ["two ÷ one, paired rounds (min–max)",
         f"{min(ratios):.2f}–{max(ratios):.2f}×" if ratios else "–"],
        ["two ÷ one, ratio of the medians", f"{two / one:.2f}×" if one else "–"],
        ["inferences in the `two` rounds, A / B",
         f"{inf['A']} / {inf['B']} (B {100 * share_b:.0f} %)"],
        ["inferences B ran during the `one` rounds (should be 0)",
         str(sum(r.inferences["B"] for r in by["one"]))],
        ["Triton CPU ms per image, one / two (both servers' groups)",
         per_image(lambda r: sum(r.cpu_s.values()))],
        ["gateway CPU ms per image, one / two", per_image(lambda r: r.gateway_cpu_s)],
        ["caller errors, all rounds", str(sum(sum(r.result.errors.values()) for r in rounds))],
    ]  # fmt: skip


def tritons(stack: contextlib.ExitStack, repos: dict[str, Path], threads: int) -> dict[str, Any]:
    """A real tritonserver per name, each on its repository (TORCH_THREADS applied)."""
    servers = {n: stack.enter_context(h.triton(r, torch_threads=threads)) for n, r in repos.items()}
    print("  tritonservers " + ", ".join(f"{n} {s.grpc_url}" for n, s in servers.items()))
    return servers


def triton_gateway(stack, repository: Path, name: str, urls, args, **settings: object) -> Any:
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


def write(args, name: str, title: str, info, what_ran, sections, summary: str) -> None:
    """The report `args.out` (default bench/results/`name`)."""
    text = h.report(f"{title} ({args.model})", info, {"What ran": what_ran, **sections})
    h.write_result(args.out or h.RESULTS_DIR / name, text, summary)


async def run_balance(args: argparse.Namespace, info: list, repository: Path) -> None:
    jpegs, counter = h.photo_pool(64, seed=3), itertools.count()
    with contextlib.ExitStack() as stack:
        servers = tritons(stack, dict.fromkeys(SERVERS, repository), args.torch_threads)
        urls = {name: server.grpc_url for name, server in servers.items()}
        gateways = {
            path: triton_gateway(stack, repository, f"gateway-{path}", replicas, args)
            for path, replicas in (("one", [urls["A"]]), ("two", [urls["A"], urls["B"]]))
        }

        def counters(path: str) -> dict[str, float]:
            out = {"gateway": h.group_total(gateways[path].pid, h.cpu_seconds)}
            for n, server in servers.items():
                stats = h.triton_stats(server.grpc_url, [IMAGE_MODEL])[IMAGE_MODEL]
                out[f"inferences {n}"], out[f"executions {n}"] = stats
                out[f"cpu {n}"] = h.group_total(server.pid, h.cpu_seconds)
            return out

        async def measure(index: int, path: str) -> Round:
            async with h.channel(gateways[path].target) as channel:
                result = await h.closed_loop(
                    h.grpc_calls(h.RawClip(channel), jpegs)["image"],
                    label=f"round {index} {path}", concurrency=args.callers,
                    seconds=args.seconds, min_calls=args.callers, counter=counter,
                    counters=lambda: counters(path),
                )  # fmt: skip
            change = result.counters
            by_server = ({s: change[f"{key} {s}"] for s in SERVERS} for key in KEYS)
            r = Round(index, path, result, *by_server, change["gateway"])
            print("  " + " | ".join(map(str, r.row())), flush=True)
            return r

        h.section("warm-up point per gateway (not reported)")
        for path in gateways:
            await measure(0, path)
        h.section(f"{args.rounds} interleaved rounds of each path")
        by_round = await h.interleaved(args.rounds, ["one", "two"], measure)
        rounds = [r for each in by_round for r in each.values()]
        for path, gw in gateways.items():
            if not gw.running:
                print(f"  WARNING: gateway {path} died during the run", flush=True)
    two = [r for r in rounds if r.path == "two"]
    inf = {s: sum(r.inferences[s] for r in two) for s in SERVERS}
    lopsided = []
    if sum(inf.values()) and not 0.25 <= inf["B"] / sum(inf.values()) <= 0.75:
        lopsided = [
            f"**The split is lopsided** ({inf['A']} / {inf['B']}). The gateway sends one Triton "
            f"request per batch: the `two` rounds held only "
            f"{sum(sum(r.executions.values()) for r in two)} batches. Per-call round robin "
            "balances many small calls, not a slow stream of large batches.", "",
        ]  # fmt: skip
    what_ran = [
        f"- Two real `tritonserver`s on the same repository: A at `{urls['A']}`, B at "
        f"`{urls['B']}`. Gateway `one` over A, gateway `two` over `ipv4:A,B` (round robin per "
        f"call); own processes, cache off, `--max-inflight-batches {args.inflight}`.",
        f"- {args.callers} closed-loop callers, one image per EmbedImage call "
        f"({h.photo_note(jpegs)}, every image's bytes new); {args.rounds} interleaved rounds "
        f"of each path, each ≥ {args.seconds:g} s. Counters: bench/README.md (replicas).",
    ]
    reading = [
        *lopsided,
        f"This machine has {info[1][1]}: both servers, both gateways and the load generator "
        "share them, so a second Triton adds no compute; two ÷ one is what spreading the "
        "batches costs, not a speed-up figure (`bench/gpu.sh` measures one server per GPU).",
    ]
    summary = h.md_table(["figure", "value"], summary_rows(rounds))
    sections = {"Summary": summary, "Rounds": h.md_table(HEADERS, [r.row() for r in rounds])}
    title = "One against two local Triton servers behind one gateway"
    write(
        args, "replicas.md", title, info, what_ran, sections | {"How to read it": reading}, summary
    )


# ---------------------------------------------------------------------- scenario: foreign
def other_export(model: str) -> Path:
    """The same architecture with random weights (seeded): another model id and hash."""
    import torch

    torch.manual_seed(2525)
    return h.exported(Path(tempfile.mkdtemp(prefix="bench-rep-foreign-")) / "repo", model, "none")


async def reference_texts(repository: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """What an embedded gateway of `repository` answers for each text (no cache)."""
    settings = gateway_settings(repository, local_cache_items=0)
    out: dict[str, np.ndarray] = {}
    async with running_gateway(settings) as gw, AsyncClipClient(f"127.0.0.1:{gw.port}") as client:
        for start in range(0, len(texts), 32):
            chunk = texts[start : start + 32]
            out.update(zip(chunk, (await client.embed_text(chunk)).vectors, strict=True))
    return out


def near(vectors: np.ndarray, vector: np.ndarray, tolerance: float) -> bool:
    """Whether `vector` is within `tolerance` (max abs) of one of `vectors`."""
    return bool(len(vectors)) and float(np.abs(vectors - vector).max(axis=1).min()) < tolerance


async def run_foreign(args: argparse.Namespace, info: list, repository: Path) -> None:
    theirs = other_export(args.model)
    jpegs = h.photo_pool(16, (160, 120), seed=5)
    answered: dict[str, np.ndarray] = {}
    image_vectors: list[np.ndarray] = []
    calls: Counter[str] = Counter()

    def counts(server) -> dict[str, int]:
        stats = h.triton_stats(server.grpc_url, [IMAGE_MODEL, TEXT_MODEL])
        return {model: c[0] for model, c in stats.items()}

    with contextlib.ExitStack() as stack:
        repos = {"A": repository, "F": theirs, "A2": repository}
        servers = tritons(stack, repos, args.torch_threads)
        redis = stack.enter_context(h.redis())
        urls = [s.grpc_url for s in servers.values()]
        gateway = triton_gateway(
            stack, repository, "gateway-foreign", urls, args, redis_url=redis.url
        )
        before = {name: counts(server) for name, server in servers.items()}
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
        ran = {n: {m: v - before[n][m] for m, v in counts(s).items()} for n, s in servers.items()}
        import redis as redis_py

        raw = redis_py.Redis.from_url(redis.url)
        stored = [raw.get(key) for key in raw.scan_iter("clip:*:emb:*")]
    h.section("checking every answered text against both exports' own vectors")
    texts = sorted(answered)
    ours, foreign = [await reference_texts(r, texts) for r in (repository, theirs)]
    outcome = Counter(
        "ours" if near(ours[t][None], answered[t], 1e-5)
        else "foreign" if near(foreign[t][None], answered[t], 1e-5) else "neither"
        for t in texts
    )  # fmt: skip
    known = np.stack([*answered.values(), *image_vectors]) if answered else np.zeros((0, 1))
    theirs_known = np.stack(list(foreign.values())) if foreign else np.zeros((0, 1))
    cached: Counter[str] = Counter()
    for value in stored:
        vector = np.frombuffer(value[1:], dtype="<f4") if value else np.zeros(0)
        cached["other" if not near(known, vector, 1e-6) else
               "foreign" if near(theirs_known, vector, 1e-5) else "answered"] += 1  # fmt: skip
    summary = h.md_table(["figure", "value"], [
        ["callers, seconds", f"{args.callers}, {args.seconds:g}"],
        ["calls: EmbedText / EmbedImage", f"{calls['text']} / {calls['image']}"],
        ["caller errors", ", ".join(f"{k}: {v}" for k, v in result.errors.items()) or "0"],
        ["text vectors answered: ours / foreign / neither",
         f"{outcome['ours']} / {outcome['foreign']} / {outcome['neither']}"],
        ["Redis entries: answered vectors / foreign / other",
         f"{cached['answered']} / {cached['foreign']} / {cached['other']}"],
        *([f"inferences {n} ran (image, text)", f"{r[IMAGE_MODEL]}, {r[TEXT_MODEL]}"]
          for n, r in ran.items()),
    ])  # fmt: skip
    what_ran = [
        "- Three real `tritonserver`s: A and A2 on the gateway's export, F on another export "
        "of the same architecture (random weights: another model id and weights hash).",
        f"- One gateway with `--triton-url ipv4:{','.join(urls)}` (F in the middle), a real "
        f"redis-server, no in-process cache, `--max-inflight-batches {args.inflight}`; "
        f"{args.callers} closed-loop callers for {args.seconds:g} s, alternating EmbedText "
        "(a new text) and EmbedImage (new JPEG bytes).",
        "- Afterwards every answered text vector is compared (1e-5) with what embedded "
        "gateways of both exports answer; every value in Redis with the vectors answered.",
    ]
    result_lines = [
        summary, "",
        "F's configs are read (by the probes), its vectors never asked for: the gateway sends "
        "inference only to replicas whose identity it checked. The issue's run of the code "
        "before this change answered 96 of 950 calls with F's vectors.",
    ]  # fmt: skip
    if len(stored) < len(known):
        result_lines += [
            "", f"Redis holds {len(stored)} of the {len(known)} vectors answered: a write the "
            "cache gives up on (it never fails a call) is not retried.",
        ]  # fmt: skip
    title = "Three Triton replicas, one serving another export"
    write(args, "replicas-foreign.md", title, info, what_ran, {"Result": result_lines}, summary)


# ---------------------------------------------------------------------- scenario: drain
async def run_drain(args: argparse.Namespace, info: list, repository: Path) -> None:
    jpegs = h.photo_pool(16, (160, 120), seed=7)
    rows, phase, stop, worst, total_errors = [], "before", asyncio.Event(), 0.0, 0
    errors: dict[str, Counter[str]] = {}
    calls: Counter[str] = Counter()
    with contextlib.ExitStack() as stack:
        servers = tritons(stack, dict.fromkeys(SERVERS, repository), args.torch_threads)
        a, urls = servers["A"], [s.grpc_url for s in servers.values()]
        gateway = triton_gateway(stack, repository, "gateway-drain", urls, args)
        served = lambda: h.triton_stats(a.grpc_url, [IMAGE_MODEL])[IMAGE_MODEL][0]  # noqa: E731
        async with AsyncClipClient(gateway.target) as client:

            async def caller(index: int) -> None:
                for n in itertools.count(1):
                    if stop.is_set():
                        return
                    current = phase
                    image = h.unique_jpeg(jpegs[n % len(jpegs)], index * 1_000_000 + n)
                    try:
                        await client.embed_image([image])
                    except grpc.aio.AioRpcError as exc:
                        errors.setdefault(current, Counter())[exc.code().name] += 1
                    calls[current] += 1

            workers = [asyncio.create_task(caller(i)) for i in range(args.callers)]
            try:
                for index in range(1, args.cycles + 1):
                    errors.clear()
                    calls.clear()
                    phase = "before"
                    await asyncio.sleep(args.settle_s)
                    phase = "drain"
                    a.send_signal(signal.SIGTERM, group=False)
                    await asyncio.sleep(KILL_AFTER_TERM_S)
                    await asyncio.to_thread(a.kill)
                    await asyncio.sleep(args.settle_s)
                    await asyncio.to_thread(a.start)
                    phase, back = "after", time.monotonic()
                    while not served() and time.monotonic() - back < 120:  # noqa: ASYNC110
                        await asyncio.sleep(0.1)
                    rejoin = time.monotonic() - back if served() else float("inf")
                    await asyncio.sleep(args.settle_s)
                    text = ", ".join(
                        f"{p} {c}: {n}" for p, v in errors.items() for c, n in v.items()
                    )
                    rows.append([index, calls["before"], calls["drain"], calls["after"],
                                 text or "0", f"{rejoin:.1f}"])  # fmt: skip
                    worst = max(worst, rejoin)
                    total_errors += sum(sum(v.values()) for v in errors.values())
                    print(f"  cycle {index}: calls {dict(calls)}, errors {text or 0}, A rejoined "
                          f"{rejoin:.1f} s after its restart", flush=True)  # fmt: skip
            finally:
                stop.set()
                await asyncio.gather(*workers)
    summary = h.md_table(["figure", "value"], [
        ["cycles (SIGTERM, SIGKILL 1 s later, restart)", str(len(rows))],
        ["callers", str(args.callers)],
        ["caller errors, all cycles", str(total_errors)],
        ["rejoin after restart, worst", f"{worst:.1f} s"],
    ])  # fmt: skip
    headers = ["cycle", "calls before", "calls SIGTERM→restart", "calls after", "caller errors"]
    what_ran = [
        f"- Two real `tritonserver`s A and B on the same export; one gateway with `--triton-url "
        f"ipv4:{','.join(urls)}`, cache off, `--max-inflight-batches {args.inflight}`; "
        f"{args.callers} closed-loop callers, one new image per EmbedImage call.",
        f"- Each cycle: {args.settle_s:g} s of load; SIGTERM to A's tritonserver (that process "
        f"only, as the kubelet signals PID 1); SIGKILL of its group {KILL_AFTER_TERM_S:g} s "
        f"later; {args.settle_s:g} s on B alone; A restarted on the same ports; the time until "
        f"A runs an inference again; {args.settle_s:g} s more.",
    ]
    cycles = [
        h.md_table([*headers, "rejoin s"], rows), "",
        "The issue's run of the code before this change: 233 calls failed with UNAVAILABLE in "
        "8 s of the same drain under 16 callers.",
    ]  # fmt: skip
    sections = {"Summary": summary, "Cycles": cycles}
    write(
        args,
        "replicas-drain.md",
        "A Triton replica drained under load",
        info,
        what_ran,
        sections,
        summary,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = h.parser(__doc__)
    p.add_argument("--scenario", default="balance", choices=("balance", "foreign", "drain"))
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
    if not 1 <= args.callers <= 256 or not 1 <= args.rounds <= 20 or not 0 < args.seconds <= 600:
        p.error("--callers must be 1..256, --rounds 1..20 and --seconds in (0, 600]")
    return args


async def run(args: argparse.Namespace) -> int:
    h.section(f"replicas, {args.scenario}: {args.model}")
    scenario = {"balance": run_balance, "foreign": run_foreign, "drain": run_drain}[args.scenario]
    await scenario(args, h.machine_info(args.torch_threads), h.model_repository(args.model))
    return 0


if __name__ == "__main__":
    sys.exit(h.main("bench.replicas", parse_args(), run))
