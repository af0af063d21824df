"""Every scenario in one go (`make bench`); `--quick`: each one tiny, on the demo model.

    python -m bench.run_all                  # the figures (about 15 minutes on 2 cores)
    python -m bench.run_all --quick          # every scenario, minimal points (a few minutes)
    python -m bench.run_all --quick --results-dir /tmp/r --only cache http

The steps: `SCENARIOS` below; bench/README.md says which run has which.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import DEMO_MODEL, REPO_ROOT, RESULTS_DIR, section

D = DEMO_MODEL
#: name → (arguments of the full run or None: not in it, of the quick run, result file);
#: {out} is the result file's path, {dir} the results folder.
SCENARIOS = {
    "throughput, demo model": (
        f"throughput --model {D} --results-dir {{dir}}",
        "throughput --quick --seconds 0.3 --concurrency 1,4 --batches 1,4 --paired-rounds 1 "
        "--results-dir {dir}", f"throughput-{D}.md"),
    "throughput, ViT-B-32 + Triton": (
        "throughput --model ViT-B-32 --with-triton --paired-rounds 3 --results-dir {dir}", None,
        "throughput-ViT-B-32.md"),
    "cache": ("cache --out {out}", "cache --seconds 0.3 --concurrency 4 --out {out}", "cache.md"),
    "load": ("load --callers 32 --seconds 30 --out {out}",
             "load --callers 8 --seconds 2 --out {out}", "load.md"),
    "http against grpc": ("http --out {out}",
                          "http --rounds 2 --seconds 0.5 --concurrency 8 --out {out}",
                          "http-vs-grpc.md"),
    "replicas, 2 Tritons": ("replicas --out {out}",
                            "replicas --rounds 1 --seconds 1 --callers 8 --out {out}",
                            "replicas.md"),
    "replicas drain": (None, "replicas --scenario drain --cycles 1 --settle-s 1 --callers 4 "
                       "--out {out}", "replicas-drain.md"),
    "replicas foreign": (None, "replicas --scenario foreign --seconds 3 --callers 4 --out {out}",
                         "replicas-foreign.md"),
    "onnx": (None, f"onnx --model {D} --rounds 1 --seconds 0.3 --out {{out}}", "onnx.md"),
    "soak hostile": (None, "soak --mode hostile --seconds 4 --callers 2 --out {out}",
                     "soak-hostile.md"),
    "soak faults": (None, "soak --mode faults --seconds 8 --redis-kills 1 --triton-kills 0 "
                    "--out {out}", "soak-faults.md"),
    "profile": (None, f"profile_images --model {D} --seconds 1 --concurrency 8 "
                "--results-dir {dir}", f"profile-images-{D}.md"),
    "families": (None, f"families --only {D} --out {{out}}", "families.md"),
    # Standalone scripts (their own parsers, no threading flags: OMP_WAIT_POLICY is set
    # in their environment instead). Quick: their tables, each in well under 2 minutes.
    "gateway cpu": (None, "gateway_cpu --quick --rounds 1 --photos 2 --out {out}",
                    "gateway-cpu.md"),
    "quantization": (None, "quantization --corpus 200 --queries 20 --out {out}", "quantization.md"),
    "lanes": (None, "lanes --baseline-ref HEAD --rounds 1 --seconds 2 --warm-s 1 "
              "--bulk-images 2000 --out {out}", "lanes.md"),
    "tracing": (None, "tracing --rounds 1 --seconds 2 --callers 2 --out {out}", "tracing.md"),
    "catalog": (None, "catalog --n 2000 --images 16 --out {out}", "catalog.md"),
    # bench/gpu.sh itself, on the CPU: its steps as it runs them, its steps table.
    "gpu smoke": (None, f"env MODELS={D} PRECISIONS=fp32 SECONDS_PER_POINT=0.3 CONCURRENCY=2 "
                  "PY={python} WORK={dir}/gpu-work OUT={dir} bash bench/gpu.sh --smoke",
                  "gpu-smoke.md"),
}  # fmt: skip

#: Steps whose script takes no `--omp-wait-policy`.
STANDALONE = ("gateway cpu", "quantization", "lanes", "tracing", "catalog")


def steps(args: argparse.Namespace) -> list[tuple[str, list[str], Path]]:
    """(name, command, result file) of each step asked for."""
    out = []
    for name, (full, quick, result) in SCENARIOS.items():
        command = quick if args.quick else full
        if command is None or (args.only and not any(word in name for word in args.only)):
            continue
        path = args.results_dir / result
        words = command.format(out=path, dir=args.results_dir, python=sys.executable).split()
        if words[0] != "env":  # a benchmark module, in the asked threading environment
            policy = [] if name.startswith(("http", "families")) else ["--omp-wait-policy"]
            words = [sys.executable, "-m", f"bench.{words[0]}", *words[1:]]
            if name in STANDALONE:
                if args.omp_wait_policy != "inherit":
                    words = ["env", f"OMP_WAIT_POLICY={args.omp_wait_policy}", *words]
            elif policy:
                words += [*policy, args.omp_wait_policy]
        out.append((name, words, path))
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
    for name, command, result in steps(args):
        section(f"run_all: {name}")
        started = time.perf_counter()
        try:
            run = subprocess.run(command, env=env, timeout=args.step_timeout_s, cwd=REPO_ROOT)
            status = "ok" if run.returncode == 0 else f"failed (exit {run.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {args.step_timeout_s:g} s"
        outcomes.append((name, status, time.perf_counter() - started, result))
    section("run_all: summary")
    for name, status, seconds, result in outcomes:
        print(f"  {name:<34} {status:<18} {seconds:6.0f} s   {result}")
    print(f"  total {time.perf_counter() - began:.0f} s; results in {args.results_dir}")
    return 0 if all(status == "ok" for _, status, _, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
