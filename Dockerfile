# syntax=docker/dockerfile:1.7
#
# Images of the CLIP embedding service, one file, several targets:
#
#   gateway  the Python gRPC gateway: Triton backend and in-process ONNX Runtime, no torch
#            (the base install of pyproject.toml), non-root, no build tools
#   triton   NVIDIA Triton Inference Server + the exported TorchScript model repository
#   models   just the model repository on busybox, for the chart's init-container mode
#
#   make image            the gateway, offline: base image, wheels and model from the host
#   make image-embedded   the same with the demo model baked in as ONNX (backend embedded)
#
#   docker build --target gateway -t clip-service-gateway:0.1.0 .
#   docker build --target triton  -t clip-service-triton:0.1.0 \
#       --build-arg MODEL_NAME=ViT-B-32 --build-arg PRETRAINED=laion2b_s34b_b79k .
#   docker build --target triton  -t clip-service-triton:0.1.0-trt --build-arg FLAVOR=onnx-tensorrt .
#   docker build --target gateway -t clip-service-gateway:0.1.0-embedded-onnx \
#       --build-arg GATEWAY_BACKEND=embedded .
#
# Without build arguments, Python packages come from PyPI and the export stage downloads
# pretrained weights (Hugging Face / open_clip hub), so `docker build` needs internet access.
# Offline (what `make image` does): WHEELHOUSE=<folder of wheels in the build context>
# installs the gateway from it alone (`pip --no-index`), and MODEL_SOURCE=context takes the
# model repository exported on the host (MODEL_DIR) instead of the export stage; neither
# step then touches the network (`--network none`).
# PRETRAINED=none exports random weights (smoke tests); PRETRAINED=/ctx/<path in the build
# context> a local checkpoint.
# GATEWAY_BACKEND=embedded keeps the exported weights in the gateway image (and makes
# embedded its default backend), for a single-container deployment without Triton.
# FLAVOR picks what is exported: pytorch (TorchScript, the default for Triton), onnx (ONNX
# Runtime: Triton's onnxruntime backend on CPU or GPU, and in-process in an embedded
# gateway; the embedded gateway's default, as its image has no torch) or onnx-tensorrt
# (onnx with TensorRT fp16 on GPU instances).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The Triton image's libtorch must load TorchScript written by the export stage's torch
# (2.14.1): TorchScript files load in the same or a newer libtorch, not an older one. Check
# the NGC support matrix when changing either side. FLAVOR=onnx files are opset 20: the
# image's ONNX Runtime must be 1.17 or newer.
ARG TRITON_TAG=26.10
ARG BUSYBOX_IMAGE=busybox:1.37
# Where the gateway's model repository comes from: export (the export stage) or context
# (MODEL_DIR in the build context, exported on the host).
ARG MODEL_SOURCE=export

# ---------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
# A folder of the build context holding every wheel the gateway needs (`make image`
# prepares it with scripts/build_image.sh): pip then reads only it, so the build needs no network and takes the same wheels every
# time. Empty: PyPI.
ARG WHEELHOUSE=""
# The gateway's dependencies first, in their own layer (they change less often than the
# code), with setuptools for building the project below without fetching it.
RUN --mount=type=bind,source=.,target=/ctx \
    if [ -n "${WHEELHOUSE}" ]; then set -- --no-index --find-links "/ctx/${WHEELHOUSE}"; fi \
    && python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
    && pip install --no-cache-dir "$@" -c constraints.txt -r /tmp/requirements.txt "setuptools>=68"

COPY protos ./protos
COPY service ./service
# The project itself; then prove the gateway carries no torch, open_clip or transformers.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && python -c "import importlib.util as u, sys; found = [m for m in ('torch', 'torchvision', 'open_clip', 'transformers') if u.find_spec(m)]; sys.exit(f'the gateway must not carry {found}' if found else 0)" \
    && clipsvc --help > /dev/null

# ---------------------------------------------------------------------------- gateway-venv
# What the gateway image copies: the venv without what the gateway never runs (~65 MB of
# ~300; the image must stay under 400 MB):
# - pip and setuptools: nothing installs at run time;
# - the Hugging Face hub client, which `tokenizers` requires only for
#   `Tokenizer.from_pretrained` (hub downloads), with hf-xet and the packages only it uses:
#   the gateway reads tokenizer.json from its model repository, offline;
# - ONNX Runtime's C API library (34 MB): the Python binding is a library of its own that
#   does not load it (`readelf -d`: not NEEDED); test_image.py runs ONNX Runtime in the image;
# - the test suites packages ship (numpy's alone is ~12 MB).
FROM builder AS gateway-venv
RUN pip uninstall --yes huggingface_hub hf-xet fsspec filelock pyyaml httpx2 httpcore2 truststore \
    && pip uninstall --yes pip setuptools \
    && rm /opt/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* \
    && find /opt/venv -depth -type d -path '*/site-packages/*/tests' -exec rm -rf {} + \
    && python -c "import onnxruntime, tokenizers, service.wiring, service.core.hf_tokenize"

# ---------------------------------------------------------------------------- export
FROM builder AS export

# torch first, in its own layer: it is most of this stage and changes least often. The CPU
# index gives wheels without the ~4 GB of CUDA libraries an export never needs (the GPU
# work happens in Triton); torchvision from the same index matches that torch.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        torch==2.14.1 torchvision==0.29.1
# torch and torchvision are already satisfied, so pip keeps the CPU builds; the
# constraints pin everything else to the versions the test suite ran with.
RUN pip install --no-cache-dir -c constraints.txt ".[export]" \
    && python -c "import torch; assert torch.version.cuda is None, 'CUDA torch crept in'"

ARG MODEL_NAME=ViT-B-32
ARG PRETRAINED=laion2b_s34b_b79k
# pytorch | onnx | onnx-tensorrt (see the top of this file); empty: onnx for an embedded
# gateway (its image has no torch), pytorch otherwise.
ARG FLAVOR=""
ARG GATEWAY_BACKEND=triton
# Extra `clipsvc export` flags, e.g. "--max-batch-size 64 --instances 2".
ARG EXPORT_ARGS=""

# The cache mount keeps downloaded weights across rebuilds without putting them in a
# layer; the bind mount exposes the build context at /ctx, so PRETRAINED=/ctx/demo/<file>
# exports a local checkpoint without copying it into the image.
# EXPORT_ARGS stays unquoted on purpose: it is split into separate flags.
# FLAVOR becomes the export flags and the file every tower must then hold.
RUN --mount=type=cache,target=/root/.cache \
    --mount=type=bind,source=.,target=/ctx \
    flavor="${FLAVOR}" \
    && if [ -z "${flavor}" ]; then \
        if [ "${GATEWAY_BACKEND}" = embedded ]; then flavor=onnx; else flavor=pytorch; fi; \
    fi \
    && case "${flavor}" in \
        pytorch) set -- --flavor pytorch; model_file=model.pt ;; \
        onnx) set -- --flavor onnx; model_file=model.onnx ;; \
        onnx-tensorrt) set -- --flavor onnx --tensorrt; model_file=model.onnx ;; \
        *) echo "FLAVOR must be pytorch, onnx or onnx-tensorrt, not '${flavor}'" >&2; exit 1 ;; \
    esac \
    && clipsvc export \
        --model "${MODEL_NAME}" \
        --pretrained "${PRETRAINED}" \
        --out /export \
        "$@" \
        ${EXPORT_ARGS} \
    && test -f /export/metadata.json \
    && test -f "/export/clip_image/1/${model_file}" \
    && test -f "/export/clip_text/1/${model_file}"

# ---------------------------------------------------------------------------- gateway-models
# The gateway needs metadata.json (model id, image size, tokenizer) even with
# backend=triton; the weights only with backend=embedded, and then as ONNX (the image has
# no torch). Others are dropped so the image does not carry hundreds of MB it never reads.
FROM export AS models-export

# MODEL_SOURCE=context: a repository exported on the host (`make image` stages one here).
FROM ${PYTHON_IMAGE} AS models-context
ARG MODEL_DIR=.cache/image/models/gateway
COPY ${MODEL_DIR} /export

# A stage of this file picked by MODEL_SOURCE (models-export or models-context), not an image.
# hadolint ignore=DL3006
FROM models-${MODEL_SOURCE} AS gateway-models
ARG GATEWAY_BACKEND=triton
RUN test -f /export/metadata.json \
    && if [ "${GATEWAY_BACKEND}" != "embedded" ]; then \
        find /export \( -name model.pt -o -name 'model.onnx*' \) -delete; \
    elif [ -n "$(find /export -name model.pt)" ]; then \
        echo "an embedded gateway runs ONNX (its image has no torch): export with FLAVOR=onnx" >&2; \
        exit 1; \
    fi

# ---------------------------------------------------------------------------- gateway
FROM ${PYTHON_IMAGE} AS gateway

ARG GATEWAY_BACKEND=triton
LABEL org.opencontainers.image.title="clip-service-gateway" \
      org.opencontainers.image.description="CLIP embeddings over gRPC (gateway)"

# A fixed numeric uid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 clip \
    && useradd --system --uid 10001 --gid clip --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin clip

COPY --from=gateway-venv /opt/venv /opt/venv
COPY --from=gateway-models /export /opt/clip/model_repository

# Caches point at /tmp because production runs with a read-only root filesystem and an
# emptyDir on /tmp. HF_HUB_OFFLINE: the CLIP tokenizer ships its vocabulary, and a
# gateway must never stall on a hub download at start.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    CLIP_HOST=0.0.0.0 \
    CLIP_PORT=50051 \
    CLIP_METRICS_PORT=9090 \
    CLIP_HTTP_PORT=8080 \
    CLIP_BACKEND=${GATEWAY_BACKEND} \
    CLIP_MODEL_REPOSITORY=/opt/clip/model_repository

USER 10001:10001
WORKDIR /opt/clip
EXPOSE 50051 9090 8080

# No HEALTHCHECK: Kubernetes ignores it (the chart uses kubelet gRPC probes), and a
# plaintext check would report a TLS-enabled gateway as unhealthy.
ENTRYPOINT ["clipsvc"]
CMD ["serve"]

# ---------------------------------------------------------------------------- models
FROM ${BUSYBOX_IMAGE} AS models
COPY --from=export /export /models
USER 65534:65534

# ---------------------------------------------------------------------------- triton
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3 AS triton

LABEL org.opencontainers.image.title="clip-service-triton" \
      org.opencontainers.image.description="Triton Inference Server with the CLIP encoders"

COPY --from=export /export /models

# The NGC image's non-root user (triton-server) has uid 1000.
USER 1000:1000
EXPOSE 8000 8001 8002

# The NGC entrypoint (/opt/nvidia/nvidia_entrypoint.sh) stays; it runs CMD.
CMD ["tritonserver", "--model-repository=/models", "--strict-model-config=true", \
     "--exit-timeout-secs=30", "--log-verbose=0"]
