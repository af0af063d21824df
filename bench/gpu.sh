#!/usr/bin/env bash
# The GPU benchmark in one run (under 10 minutes on 1× H200, 16 cores): export ViT-B-32
# and ViT-L-14 (random weights, fp32 and fp16, pytorch flavor), then for each: Triton
# alone (perf_analyzer where it runs, else a tritonclient gRPC loop) and the gateway end
# to end against that Triton, images/s and texts/s and the ratio gateway ÷ Triton
# alone, in bench/results/gpu-cuda.md. Each step runs in its own process under its own
# timeout (bench/gpu.py), so a failing step does not lose the others; a summary ends
# the run. Installs nothing (the machine has no internet): it expects this repository's
# .venv (or PY=/path/to/python with torch and the project importable). Results go to
# $OUT when set, else bench/results/. Exits 2 without a Python, 3 without CUDA (unless
# --smoke), 1 when any step was not ok, else 0.
#
#   bash bench/gpu.sh                       # the GPU run
#   bash bench/gpu.sh --smoke               # CPU smoke run: demo model, tiny points, no CUDA
#   GPU_BENCH_SMOKE=1 bash bench/gpu.sh     # the same
#   OUT=/tmp/out SECONDS_PER_POINT=2 BUDGET_S=480 bash bench/gpu.sh
#   WITH_THROUGHPUT=1 bash bench/gpu.sh     # also bench.throughput --device cuda (+~5 min)
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
RESULTS="${OUT:-bench/results}"
SMOKE="${GPU_BENCH_SMOKE:-0}"
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    *) echo "unknown argument: $arg (only --smoke)" >&2; exit 2 ;;
  esac
done
export HF_HUB_OFFLINE=1 GPU_BENCH_SMOKE="$SMOKE"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's bench/ and service/
case "$PY" in  # the venv's bin/ first: its perf_analyzer and clipsvc
  */*) PATH="$(cd "$(dirname "$PY")" && pwd):$PATH" ;;
esac
export PATH
if [ "$SMOKE" = 1 ]; then
  MODELS="${MODELS:-clip-demo-shapes}"
  WORK="${WORK:-bench/.models/gpu-smoke}"
  LOG="$RESULTS/gpu-smoke-run.log"
  BUDGET_S="${BUDGET_S:-900}"  # 2 shared CPU cores
else
  MODELS="${MODELS:-ViT-B-32 ViT-L-14}"
  WORK="${WORK:-bench/.models/gpu}"
  LOG="$RESULTS/gpu-run.log"
  BUDGET_S="${BUDGET_S:-540}"  # whole run, checks and report included: under 10 minutes
fi
PRECISIONS="${PRECISIONS:-fp32 fp16}"
EXTRA=()
[ -n "${SECONDS_PER_POINT:-}" ] && EXTRA+=(--seconds "$SECONDS_PER_POINT")
[ -n "${CONCURRENCY:-}" ] && EXTRA+=(--concurrency "$CONCURRENCY")
mkdir -p "$RESULTS" "$WORK"
rm -rf "$WORK/parts"
: > "$WORK/steps.tsv"
exec > >(tee "$LOG") 2>&1
STARTED=$(date +%s)

# step NAME TIMEOUT_S COMMAND...: runs COMMAND under min(TIMEOUT_S, what is left of the
# budget), records its exit status and duration in $WORK/steps.tsv; never stops the run.
step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - STARTED)))
  if [ "$left" -lt 20 ]; then
    echo "== step $name: SKIPPED (${left}s of the ${BUDGET_S}s budget left)"
    printf '%s\t%s\t%s\n' "$name" "skipped" "0" >> "$WORK/steps.tsv"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== step $name (timeout ${limit}s, $(( $(date +%s) - STARTED ))s into the run)"
  local t0=$(date +%s)
  timeout -k 15 "$limit" "$@"
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >> "$WORK/steps.tsv"
  echo "== step $name: exit $rc in ${took}s"
  return 0
}

echo "== machine ($([ "$SMOKE" = 1 ] && echo 'CPU SMOKE RUN, not GPU figures' || echo GPU run))"
date -u
nproc
nvidia-smi || echo "nvidia-smi failed (no driver?)"

echo "== python and torch"
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null; then
  echo "no python at $PY: carry the repository's .venv or set PY" >&2
  exit 2
fi
"$PY" - <<'EOF'
import os, sys, torch
smoke = os.environ.get("GPU_BENCH_SMOKE") == "1"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda build", torch.version.cuda)
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if not torch.cuda.is_available():
    if smoke:
        print("no CUDA: fine for the smoke run (everything runs on the CPU)")
    else:
        sys.exit("CUDA is not available to torch")
else:
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
    x = torch.randn(1024, 1024, device="cuda")
    torch.cuda.synchronize()
    print("a CUDA matmul works:", float((x @ x).sum()) == float((x @ x).sum()))
import service, open_clip  # the project and its dependencies import
from service.processes.triton_server import TritonInstallation
print("service and open_clip import; tritonserver at", TritonInstallation.find().server)
EOF
check=$?
if [ "$check" -ne 0 ]; then
  echo "torch/CUDA/project check failed ($check)" >&2
  exit 3
fi
command -v perf_analyzer >/dev/null && echo "perf_analyzer: $(command -v perf_analyzer)" \
  || echo "perf_analyzer: not on PATH (a tritonclient loop measures Triton alone)"

for model in $MODELS; do
  for precision in $PRECISIONS; do
    # ViT-L-14 builds, scripts and self-checks (on the CPU) for longer than ViT-B-32.
    export_s=180; [ "$model" = ViT-B-32 ] && export_s=90
    step "export $model $precision" "$export_s" \
      "$PY" -m bench.gpu export --model "$model" --precision "$precision" --work "$WORK"
    step "measure $model $precision" 150 \
      "$PY" -m bench.gpu measure --model "$model" --precision "$precision" --work "$WORK" \
      "${EXTRA[@]}"
  done
done

if [ "${WITH_THROUGHPUT:-0}" = 1 ] && [ "$SMOKE" != 1 ]; then
  # The raw module and the embedded gateway with --device cuda (the earlier gpu.sh run).
  step "throughput ViT-B-32 cuda" 540 \
    "$PY" -m bench.throughput --model ViT-B-32 --device cuda --results-dir "$RESULTS"
fi

# The report gets its own time even when the budget is spent: it only reads the parts.
BUDGET_S=$((BUDGET_S + 60))
step "report" 60 "$PY" -m bench.gpu report --work "$WORK" --results-dir "$RESULTS"
failed=$(awk -F'\t' '$2 != "0"' "$WORK/steps.tsv" | wc -l)
echo "== done in $(( $(date +%s) - STARTED ))s; $failed step(s) not ok; results in $RESULTS"
cp "$WORK/steps.tsv" "$RESULTS/$([ "$SMOKE" = 1 ] && echo gpu-smoke || echo gpu)-steps.tsv"
if [ "$SMOKE" != 1 ] && [ -d "$WORK/parts" ]; then
  mkdir -p "$RESULTS/gpu-parts" && cp "$WORK"/parts/*.json "$RESULTS/gpu-parts/" 2>/dev/null
fi
ls -la "$RESULTS" | grep -E 'gpu' || true
[ "$failed" -eq 0 ]
