#!/usr/bin/env bash
# Install the `buf` CLI into <repo>/.tools/buf/buf: the tests use `buf curl` as an
# independent gRPC reflection client (it can be told to speak grpc.reflection.v1 or v1alpha).
#
# Machines here reach only package registries; buf's own npm package carries the linux
# amd64 binary (package/bin/buf). Idempotent: a working .tools/buf/buf is kept.
#
# Env: BUF_NPM_PACKAGE overrides the package spec.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${repo_root}/.tools/buf"
dest="${dest_dir}/buf"
package="${BUF_NPM_PACKAGE:-@bufbuild/buf-linux-x64@1.75.0}"

if [[ -x "${dest}" ]] && "${dest}" --version >/dev/null 2>&1; then
    echo "install_buf: ${dest} already works ($("${dest}" --version)); nothing to do"
    exit 0
fi
if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
    echo "install_buf: ${package} carries a linux/amd64 buf; this is $(uname -s)/$(uname -m)." >&2
    echo "install_buf: install buf another way and point CLIP_BUF at it." >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
echo "install_buf: npm pack ${package} into ${work}"
tarball="$(cd "${work}" && npm pack --silent "${package}" | tail -n 1)"
tar -xzf "${work}/${tarball}" -C "${work}" package/bin/buf
mkdir -p "${dest_dir}"
# Rename into place last: a crash never leaves a half-written binary the check above trusts.
install -m 0755 "${work}/package/bin/buf" "${dest}.tmp"
mv -f "${dest}.tmp" "${dest}"
echo "install_buf: installed ${dest} ($("${dest}" --version)) from ${package}"
