#!/usr/bin/env bash
# Build the gateway image offline, with podman or docker (whichever works here).
#
#   scripts/build_image.sh TAG BACKEND REPOSITORY
#
#   TAG         the image name, e.g. ghcr.io/example/clip-service-gateway:0.1.0
#   BACKEND     triton (the image keeps the repository's metadata.json only) or embedded
#               (it keeps the ONNX weights too and serves them in-process)
#   REPOSITORY  an exported model repository on this host (`clipsvc export`)
#
# `make image` and `make image-embedded` run this, and so does tests/integration/test_image.py.
# Nothing inside the build reaches the network (`--network none`); the host prepares, and
# caches under .cache/image/ (gitignored):
#   wheelhouse/        the gateway's wheels (`pip wheel`, the base install only: no torch),
#                      rebuilt when pyproject.toml or constraints.txt change
#   models/BACKEND/    a copy of REPOSITORY inside the build context
#   base-bookworm.tar  a Debian bookworm base with Python 3.11 (mmdebstrap, ~2-5 min once),
#                      imported as localhost/clip-service-base:bookworm; only when no
#                      PYTHON_IMAGE is given and python:3.11-slim-bookworm cannot be pulled
#
# Environment (optional): PYTHON_IMAGE (the base image), CONTAINER_ENGINE (podman or docker),
# WHEEL_PYTHON (a Python 3.11 with pip that prepares the wheelhouse; default python3.11).
set -euo pipefail

if [[ $# -ne 3 ]]; then
    sed -n '2,10p' "$0" >&2
    exit 2
fi
tag="$1" backend="$2" repository="$3"
case "${backend}" in
    triton | embedded) ;;
    *) echo "build_image: BACKEND must be triton or embedded, not '${backend}'" >&2; exit 2 ;;
esac
if [[ ! -f "${repository}/metadata.json" ]]; then
    echo "build_image: ${repository} holds no metadata.json: export a model first (make model)" >&2
    exit 1
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${repo_root}/.cache/image"
mkdir -p "${cache}"

# ------------------------------------------------------------------ the container engine
# podman as root on these machines: runc (crun is not installed), bounded ulimits (podman's
# defaults from the host are too high for some runtimes), and never podman's default
# network, which writes the host's firewall tables: builds get none.
engine="${CONTAINER_ENGINE:-}"
if [[ -z "${engine}" ]]; then
    if command -v podman >/dev/null 2>&1; then
        engine=podman
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        engine=docker
    else
        echo "build_image: neither podman nor a running docker found (make system-deps installs podman)" >&2
        exit 1
    fi
fi
if [[ "${engine}" == podman ]]; then
    engine_cmd=(podman --runtime runc)
    build_flags=(--network none --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 --layers)
else
    engine_cmd=("${engine}")
    build_flags=(--network none)
fi

# ------------------------------------------------------------------ the base image
base_tag=localhost/clip-service-base:bookworm
base_tar="${cache}/base-bookworm.tar"
local_base() {
    if "${engine_cmd[@]}" image inspect "${base_tag}" >/dev/null 2>&1; then
        return
    fi
    if [[ ! -f "${base_tar}" || ! -s "${base_tar}" ]]; then
        rm -rf "${base_tar}" "${base_tar}.partial"  # a directory left by an older build
        command -v mmdebstrap >/dev/null 2>&1 || {
            echo "build_image: no registry reachable and no mmdebstrap (make system-deps installs it)" >&2
            exit 1
        }
        echo "build_image: making a Debian bookworm base with mmdebstrap (a few minutes, once)" >&2
        # minbase + Python; documentation, man pages and locales left out, apt's lists
        # dropped; merged /usr set up by mmdebstrap's hook rather than the usrmerge package
        # (which pulls in perl: 45 MB).
        # --format: mmdebstrap guesses it from the name's ending, and `.partial` made
        # 1.3.x write a directory, which `podman import` cannot read.
        mmdebstrap --quiet --variant=minbase --format=tar \
            --include=python3,python3-venv,python-is-python3,ca-certificates \
            --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
            --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/doc/*' \
            --dpkgopt='path-include=/usr/share/doc/*/copyright' \
            --dpkgopt='path-exclude=/usr/share/locale/*' \
            --dpkgopt='path-exclude=/usr/share/info/*' \
            --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
            bookworm "${base_tar}.partial" \
            "deb http://deb.debian.org/debian bookworm main" \
            "deb http://deb.debian.org/debian bookworm-updates main" \
            "deb http://deb.debian.org/debian-security bookworm-security main" </dev/null
        mv "${base_tar}.partial" "${base_tar}"
    fi
    # An imported tarball has no environment: give it the PATH and locale images carry.
    "${engine_cmd[@]}" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        "${base_tar}" "${base_tag}" >/dev/null
}
python_image="${PYTHON_IMAGE:-}"
if [[ -z "${python_image}" ]]; then
    python_image=docker.io/library/python:3.11-slim-bookworm
    if ! "${engine_cmd[@]}" image inspect "${python_image}" >/dev/null 2>&1 &&
        ! timeout 120 "${engine_cmd[@]}" pull --quiet "${python_image}" >/dev/null 2>&1; then
        local_base
        python_image="${base_tag}"
    fi
fi

# ------------------------------------------------------------------ the wheelhouse
# Wheels for this host's platform and Python 3.11 (Debian bookworm's python3 and
# python:3.11-slim-bookworm are both 3.11, glibc 2.36); then what the image's own patch
# release needs besides (markers can differ between them: scripts/wheelhouse_missing.py).
run_flags=()
[[ "${engine}" == podman ]] && run_flags=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
image_python="$("${engine_cmd[@]}" run --rm --network none "${run_flags[@]}" "${python_image}" \
    python3 -c 'import platform; print(platform.python_version())')"
wheelhouse="${cache}/wheelhouse"
stamp="$(cat "${repo_root}/pyproject.toml" "${repo_root}/constraints.txt" | sha256sum | cut -c1-16)/${image_python}"
if [[ "$(cat "${wheelhouse}/.complete" 2>/dev/null)" != "${stamp}" ]]; then
    wheel_python="${WHEEL_PYTHON:-python3.11}"
    if [[ "$("${wheel_python}" -c 'import sys; print(*sys.version_info[:2], sep=".")' 2>/dev/null)" != "${image_python%.*}" ]]; then
        echo "build_image: ${wheel_python} is not Python ${image_python%.*}, the image's Python" >&2
        exit 1
    fi
    if ! "${wheel_python}" -m pip --version >/dev/null 2>&1; then
        "${wheel_python}" -m venv "${cache}/pip"
        wheel_python="${cache}/pip/bin/python"
    fi
    echo "build_image: preparing the wheelhouse (${wheelhouse}) for Python ${image_python}" >&2
    rm -rf "${wheelhouse}"
    pip_wheel=("${wheel_python}" -m pip wheel --quiet --disable-pip-version-check
        --wheel-dir "${wheelhouse}" -c "${repo_root}/constraints.txt")
    # The project's own wheel is built from the context in the image; setuptools builds it.
    (cd "${repo_root}" && "${pip_wheel[@]}" . "setuptools>=68")
    rm -f "${wheelhouse}"/clip_service-*.whl
    for _ in 1 2 3; do
        mapfile -t absent < <("${wheel_python}" "${repo_root}/scripts/wheelhouse_missing.py" \
            "${wheelhouse}" "${image_python}" | sed '/^$/d')
        [[ ${#absent[@]} -eq 0 ]] && break
        echo "build_image: adding ${absent[*]} (needed by Python ${image_python})" >&2
        "${pip_wheel[@]}" "${absent[@]}"
    done
    if compgen -G "${wheelhouse}/torch-*" >/dev/null; then
        echo "build_image: torch reached the gateway's wheelhouse" >&2
        exit 1
    fi
    echo "${stamp}" >"${wheelhouse}/.complete"
fi

# ------------------------------------------------------------------ the build
models="${cache}/models/${backend}"
rm -rf "${models}"
mkdir -p "$(dirname "${models}")"
cp -r "${repository}" "${models}"
echo "build_image: building ${tag} with ${engine} on ${python_image}" >&2
"${engine_cmd[@]}" build "${build_flags[@]}" \
    --target gateway \
    --build-arg PYTHON_IMAGE="${python_image}" \
    --build-arg WHEELHOUSE=.cache/image/wheelhouse \
    --build-arg MODEL_SOURCE=context \
    --build-arg MODEL_DIR=".cache/image/models/${backend}" \
    --build-arg GATEWAY_BACKEND="${backend}" \
    --tag "${tag}" \
    "${repo_root}"
"${engine_cmd[@]}" image inspect --format '{{.Size}}' "${tag}" |
    awk -v tag="${tag}" '{printf "build_image: %s is %.0f MB\n", tag, $1 / 1e6}' >&2
