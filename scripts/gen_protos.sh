#!/usr/bin/env bash
# Regenerates the gRPC stubs from protos/ into service/api/ (never edit those by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=service/api
rm -rf "$out/clip"
mkdir -p "$out"
"$PY" -m grpc_tools.protoc -I protos --python_out="$out" --pyi_out="$out" \
  --grpc_python_out="$out" protos/clip/v1/clip.proto
touch "$out/clip/__init__.py" "$out/clip/v1/__init__.py"
# protoc writes absolute imports for the proto package; make them package-relative.
sed -i 's/^from clip\.v1 import/from service.api.clip.v1 import/' "$out/clip/v1/clip_pb2_grpc.py"
echo "generated stubs in $out/clip/v1"
