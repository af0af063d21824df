"""Images/s through one gateway over one and over two local Triton servers (issue 15).

    python -m bench.replicas                               # 32 callers, 3 + 3 rounds of 8 s
    python -m bench.replicas --rounds 2 --seconds 5        # shorter
    python -m bench.replicas --model ViT-B-32 --callers 16

Starts two real `tritonserver`s (A and B) on the same exported repository and two
gateways in their own processes: `one` with `--triton-url 127.0.0.1:A`, `two` with
`--triton-url ipv4:127.0.0.1:A,127.0.0.1:B` (round robin per call), both with cache off
and `--max-inflight-batches 2` (two batches can be in Triton at once). The same
closed-loop single-image EmbedImage callers run through them in interleaved rounds
(the order rotates each round), so that both see the same machine. Reports images/s per
round, the medians, two ÷ one (median of the paired rounds' ratios, and of the medians),
how the inferences split between A and B (the image model's `inference_count` around
each round) and the CPU seconds each server's process group used.

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
import time
from dataclasses import dataclass

from bench import harness as h
from service.model.metadata import IMAGE_MODEL

SERVERS = ("A", "B")
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
    text = [
        *h.report_head(
            f"One against two local Triton servers behind one gateway ({args.model})", info
        ),
        "## What ran",
        "",
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
        "",
        "## Summary",
        "",
        summary,
        "",
        "## Rounds",
        "",
        h.md_table(HEADERS, [r.row() for r in rounds]),
        "",
        "## How to read it",
        "",
        *balance,
        f"This machine has {info[1][1]}: both servers, both gateways and the load generator "
        "share them, so a second Triton adds no compute. Two ÷ one shows what spreading the "
        "batches over two processes costs (or gains by overlap), and the split shows whether "
        "the round robin reaches both; it is not a speed-up figure (`bench/gpu.sh` measures "
        f"one server per GPU machine). CPU per image in the `two` rounds: "
        f"{1000 * gw_cpu['two']:.1f} ms in the gateway, {1000 * cpu['two']:.1f} ms in both "
        "Tritons.",
        "",
    ]
    return "\n".join(text), summary


async def run(args: argparse.Namespace) -> int:
    h.section(f"replicas: {args.model}, one against two tritonservers")
    info = h.machine_info(args.torch_threads)
    repository = h.model_repository(args.model)
    jpegs = h.photo_pool(64, seed=3)
    settings = {"backend": "triton", "local_cache_items": 0, "redis_url": ""}
    settings |= {"max_inflight_batches": args.inflight, "torch_threads": args.torch_threads}
    with contextlib.ExitStack() as stack:
        h.section("starting two tritonservers and two gateways")
        servers = {}
        for name in SERVERS:
            started = time.perf_counter()
            servers[name] = stack.enter_context(
                h.triton(repository, torch_threads=args.torch_threads)
            )
            took = time.perf_counter() - started
            print(f"  tritonserver {name}: {servers[name].grpc_url}, ready in {took:.1f} s")
        urls = {name: server.grpc_url for name, server in servers.items()}
        gateways = {
            path: stack.enter_context(
                h.gateway(repository, f"gateway-{path}", triton_url=url, **settings)
            )
            for path, url in {"one": urls["A"], "two": f"ipv4:{urls['A']},{urls['B']}"}.items()
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = h.parser(__doc__, out="replicas.md")
    p.add_argument("--callers", type=int, default=32, help="concurrent image callers")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each path")
    p.add_argument(
        "--inflight", type=int, default=2, help="--max-inflight-batches of both gateways"
    )
    args = p.parse_args(argv)
    if not 1 <= args.callers <= 256 or not 1 <= args.rounds <= 20 or not 0 < args.seconds <= 120:
        p.error("--callers must be 1..256, --rounds 1..20 and --seconds in (0, 120]")
    return args


if __name__ == "__main__":
    sys.exit(h.main("bench.replicas", parse_args(), run))
