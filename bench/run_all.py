"""Every benchmark in one go (`make bench`): about 15 minutes on 2 cores, `--quick` about 6.

    python -m bench.run_all
    python -m bench.run_all --quick
    python -m bench.run_all --omp-wait-policy inherit   # as the environment says

Steps, each in its own process (a failure is reported and the next step still runs):
throughput on the demo model; throughput on ViT-B-32 with Triton and 3 paired image
rounds (without either in `--quick`); the cache benchmark; a short load run; HTTP against
gRPC; one Triton against two replicas. Results go to bench/results/. Not here (long, or
needing a GPU): bench.onnx, bench.soak, bench.families, bench/gpu.sh.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from bench.common import RESULTS_DIR, add_threading_arguments, section


def steps(args: argparse.Namespace) -> list[tuple[str, list[str], str]]:
    """(name, module arguments, result file) of each step."""
    threads = ["--torch-threads", str(args.torch_threads)] if args.torch_threads else []
    threads += ["--omp-wait-policy", args.omp_wait_policy]
    quick = ["--quick"] if args.quick else []
    # --quick keeps the ends of each curve (1 and 32): the ratios and the batching gain.
    ends = ["--concurrency", "1,32", "--batches", "1,32"] if args.quick else []
    tag = f"-{args.tag}" if args.tag else ""
    tagged = ["--tag", args.tag] if args.tag else []
    out = [
        (
            "throughput, demo model",
            ["bench.throughput", "--model", "clip-demo-shapes", *quick, *ends, *threads, *tagged],
            f"throughput-clip-demo-shapes{tag}.md",
        ),
        (
            "throughput, ViT-B-32" + ("" if args.quick else " + Triton"),
            [
                "bench.throughput",
                "--model",
                "ViT-B-32",
                *quick,
                *ends,
                *threads,
                *tagged,
                *([] if args.quick else ["--with-triton", "--paired-rounds", "3"]),
            ],
            f"throughput-ViT-B-32{tag}.md",
        ),
        (
            "cache, demo model",
            [
                "bench.cache",
                *quick,
                *(["--concurrency", "16", "--seconds", "1"] if args.quick else []),
                *threads,
                "--out",
                str(RESULTS_DIR / f"cache{tag}.md"),
            ],
            f"cache{tag}.md",
        ),
        (
            "load, demo model",
            [
                "bench.load",
                "--callers",
                "32",
                "--seconds",
                "10" if args.quick else "30",
                *threads,
                "--out",
                str(RESULTS_DIR / f"load{tag}.md"),
            ],
            f"load{tag}.md",
        ),
        (
            "http against grpc, demo model",
            [
                "bench.http",
                *(["--rounds", "1", "--seconds", "2"] if args.quick else []),
                "--out",
                str(RESULTS_DIR / f"http-vs-grpc{tag}.md"),
            ],
            f"http-vs-grpc{tag}.md",
        ),
        (
            "replicas, demo model + 2 Tritons",
            [
                "bench.replicas",
                *(["--rounds", "1", "--seconds", "4"] if args.quick else []),
                "--out",
                str(RESULTS_DIR / f"replicas{tag}.md"),
            ],
            f"replicas{tag}.md",
        ),
    ]
    return [s for s in out if not args.only or any(word in s[0] for word in args.only)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="about 3 minutes instead of 12")
    add_threading_arguments(parser)
    parser.add_argument("--tag", default="", help="suffix for every result file name")
    parser.add_argument("--only", nargs="*", help="run only steps whose name has one of these")
    parser.add_argument("--step-timeout-s", type=float, default=1200.0)
    args = parser.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    outcomes: list[tuple[str, str, float, str]] = []
    began = time.perf_counter()
    for name, command, result in steps(args):
        section(f"run_all: {name}")
        started = time.perf_counter()
        try:
            rc = subprocess.run(
                [sys.executable, "-m", *command], env=env, timeout=args.step_timeout_s, check=False
            ).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {args.step_timeout_s:g} s"
        outcomes.append((name, status, time.perf_counter() - started, result))
    section("run_all: summary")
    for name, status, seconds, result in outcomes:
        print(f"  {name:<34} {status:<18} {seconds:6.0f} s   bench/results/{result}")
    print(f"  total {time.perf_counter() - began:.0f} s; results in {RESULTS_DIR}")
    return 0 if all(status == "ok" for _, status, _, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
