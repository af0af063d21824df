#!/usr/bin/env bash
# Throughput of ViT-B-32 on a GPU machine: raw module and embedded gateway with
# --device cuda, in one run (well under 10 minutes). Installs nothing (the machine has
# no internet): it expects this repository's .venv (or PY=/path/to/python with torch
# and the project importable). Results go to $OUT when set, else bench/results/.
#
#   bash bench/gpu.sh                  # SECONDS_PER_POINT=5 by default
#   OUT=/tmp/out SECONDS_PER_POINT=3 bash bench/gpu.sh
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
RESULTS="${OUT:-bench/results}"
POINT_S="${SECONDS_PER_POINT:-5}"
export HF_HUB_OFFLINE=1
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu-run.log") 2>&1

echo "== machine"
date -u
nproc
nvidia-smi || echo "nvidia-smi failed (no driver?)"

echo "== python and torch"
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null; then
  echo "no python at $PY: carry the repository's .venv or set PY" >&2
  exit 2
fi
"$PY" - <<'EOF' || { echo "torch/CUDA check failed" >&2; exit 3; }
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda build", torch.version.cuda)
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if not torch.cuda.is_available():
    sys.exit("CUDA is not available to torch")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
x = torch.randn(1024, 1024, device="cuda")
torch.cuda.synchronize()
print("a CUDA matmul works:", float((x @ x).sum()) == float((x @ x).sum()))
import service, open_clip  # the project and its dependencies import
print("service and open_clip import")
EOF

echo "== throughput, ViT-B-32 on cuda"
# 16 cores: the gateway's decode pool is no longer the 2-core bottleneck it is on CI.
timeout 540 "$PY" -m bench.throughput --model ViT-B-32 --device cuda \
  --seconds "$POINT_S" --results-dir "$RESULTS"
rc=$?
echo "== exit $rc; results in $RESULTS"
ls -la "$RESULTS"
exit $rc
