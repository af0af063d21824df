"""Every scenario in one go (`make bench`); `--quick`: each one tiny, on the demo model.

    python -m bench.run_all                  # the figures (about 15 minutes on 2 cores)
    python -m bench.run_all --quick          # every scenario, minimal points (a few minutes)
    python -m bench.run_all --quick --results-dir /tmp/r --only cache http

Each step runs in its own process (a failure is reported and the next step still runs).
The full run is the figures bench/README.md quotes (not the soaks, families, onnx,
profile or the GPU steps: long, or needing a GPU); `--quick` runs every scenario with
the shortest points that still produce its tables, which the test suite does as a
smoke test (the tables, never the figures). Results go to bench/results/ (`--results-dir`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import DEMO_MODEL, RESULTS_DIR, section

#: (name, module and arguments, result file); {out} is the result file's path.
FULL = (
    (
        "throughput, demo model",
        "throughput --model clip-demo-shapes --results-dir {dir}",
        "throughput-clip-demo-shapes.md",
    ),
    (
        "throughput, ViT-B-32 + Triton",
        "throughput --model ViT-B-32 --with-triton --paired-rounds 3 --results-dir {dir}",
        "throughput-ViT-B-32.md",
    ),
    ("cache, demo model", "cache --out {out}", "cache.md"),
    ("load, demo model", "load --callers 32 --seconds 30 --out {out}", "load.md"),
    ("http against grpc, demo model", "http --out {out}", "http-vs-grpc.md"),
    ("replicas, demo model + 2 Tritons", "replicas --out {out}", "replicas.md"),
)
QUICK = (
    (
        "throughput",
        "throughput --quick --seconds 0.3 --concurrency 1,4 --batches 1,4 --with-triton --paired-rounds 1 --results-dir {dir}",
        "throughput-clip-demo-shapes.md",
    ),
    ("cache", "cache --seconds 0.3 --concurrency 4 --out {out}", "cache.md"),
    ("load", "load --callers 8 --seconds 2 --out {out}", "load.md"),
    ("http", "http --rounds 2 --seconds 0.5 --concurrency 8 --out {out}", "http-vs-grpc.md"),
    ("replicas", "replicas --rounds 1 --seconds 1 --callers 8 --out {out}", "replicas.md"),
    ("onnx", f"onnx --model {DEMO_MODEL} --rounds 1 --seconds 0.3 --out {{out}}", "onnx.md"),
    ("soak hostile", "soak --mode hostile --seconds 4 --callers 2 --out {out}", "soak-hostile.md"),
    (
        "soak faults",
        "soak --mode faults --seconds 8 --redis-kills 1 --triton-kills 0 --out {out}",
        "soak-faults.md",
    ),
    (
        "profile",
        f"profile_images --model {DEMO_MODEL} --seconds 1 --concurrency 8 --results-dir {{dir}}",
        f"profile-images-{DEMO_MODEL}.md",
    ),
    ("families", f"families --only {DEMO_MODEL} --out {{out}}", "families.md"),
    (
        "gpu smoke",
        "gpu {step} --smoke --model clip-demo-shapes --seconds 0.3 --warmup-seconds 0.3 --concurrency 2 --work {dir}/gpu-work --results-dir {dir}",
        "gpu-smoke.md",
    ),
)


def steps(args: argparse.Namespace) -> list[tuple[str, list[list[str]], Path]]:
    """(name, commands, result file) of each step asked for."""
    out = []
    for name, command, result in QUICK if args.quick else FULL:
        if args.only and not any(word in name for word in args.only):
            continue
        path = args.results_dir / result
        text = command.format(out=path, dir=args.results_dir, step="{step}")
        threads = (
            []
            if name.startswith(("http", "families", "gpu"))
            else ["--omp-wait-policy", args.omp_wait_policy]
        )
        # The GPU benchmark is three steps (as bench/gpu.sh runs them); the others one.
        phases = ("export", "measure", "report") if "{step}" in text else ("",)
        out.append(
            (
                name,
                [
                    [
                        "bench." + text.format(step=p).split()[0],
                        *text.format(step=p).split()[1:],
                        *threads,
                    ]
                    for p in phases
                ],
                path,
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="every scenario, tiny, on the demo model")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--only", nargs="*", help="run only steps whose name has one of these")
    p.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE", "inherit"), default="PASSIVE")
    p.add_argument("--step-timeout-s", type=float, default=1200.0)
    args = p.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    outcomes, began = [], time.perf_counter()
    for name, commands, result in steps(args):
        section(f"run_all: {name}")
        started, status = time.perf_counter(), "ok"
        for command in commands:
            try:
                rc = subprocess.run(
                    [sys.executable, "-m", *command],
                    env=env,
                    timeout=args.step_timeout_s,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = f"timed out after {args.step_timeout_s:g} s"
            if rc != 0:
                status = f"failed ({rc})"
                break
        outcomes.append((name, status, time.perf_counter() - started, result))
    section("run_all: summary")
    for name, status, seconds, result in outcomes:
        print(f"  {name:<34} {status:<18} {seconds:6.0f} s   {result}")
    print(f"  total {time.perf_counter() - began:.0f} s; results in {args.results_dir}")
    return 0 if all(status == "ok" for _, status, _, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
