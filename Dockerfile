# syntax=docker/dockerfile:1.7
#
# Images of the CLIP embedding service, one file, several targets:
#
#   gateway  the Python gRPC gateway (CPU-only torch, non-root, no build tools)
#   triton   NVIDIA Triton Inference Server + the exported TorchScript model repository
#   models   just the model repository on busybox, for the chart's init-container mode
#
#   docker build --target gateway -t clip-service-gateway:0.1.0 .
#   docker build --target triton  -t clip-service-triton:0.1.0 \
#       --build-arg MODEL_NAME=ViT-B-32 --build-arg PRETRAINED=laion2b_s34b_b79k .
#   docker build --target triton  -t clip-service-triton:0.1.0-trt --build-arg FLAVOR=onnx-tensorrt .
#   docker build --target gateway -t clip-service-gateway:0.1.0-embedded-onnx \
#       --build-arg GATEWAY_BACKEND=embedded --build-arg FLAVOR=onnx .
#
# The export stage downloads pretrained weights (Hugging Face / open_clip hub), so the
# machine running `docker build` needs internet access. PRETRAINED=none exports random
# weights (smoke tests); PRETRAINED=/ctx/<path in the build context> a local checkpoint.
# GATEWAY_BACKEND=embedded keeps the exported weights in the gateway image (and makes
# embedded its default backend), for a single-container deployment without Triton.
# FLAVOR picks what is exported: pytorch (TorchScript, the default), onnx (ONNX Runtime:
# Triton's onnxruntime backend on CPU or GPU, and in-process in an embedded gateway) or
# onnx-tensorrt (onnx with TensorRT fp16 on GPU instances). On the 2-core CPU measured,
# onnx was not faster than TorchScript (bench/results/onnx-ViT-B-32.md), so pytorch stays
# the default for the embedded image too.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The Triton image's libtorch must load TorchScript written by the export stage's torch
# (2.14.1): TorchScript files load in the same or a newer libtorch, not an older one. Check
# the NGC support matrix when changing either side. FLAVOR=onnx files are opset 20: the
# image's ONNX Runtime must be 1.17 or newer.
ARG TRITON_TAG=26.10
ARG BUSYBOX_IMAGE=busybox:1.37

# ---------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

# torch first, in its own layer: it is most of the image and changes least often. The CPU
# index gives wheels without the ~4 GB of CUDA libraries the gateway never uses (the
# GPU work happens in Triton).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        torch==2.14.1 torchvision==0.29.1

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY protos ./protos
COPY service ./service
# torch and torchvision are already satisfied, so pip keeps the CPU builds; the
# constraints pin everything else to the versions the test suite ran with.
RUN pip install --no-cache-dir -c constraints.txt . \
    && python -c "import torch; assert torch.version.cuda is None, 'CUDA torch crept in'" \
    && clipsvc --help > /dev/null

# ---------------------------------------------------------------------------- export
FROM builder AS export

ARG MODEL_NAME=ViT-B-32
ARG PRETRAINED=laion2b_s34b_b79k
# pytorch | onnx | onnx-tensorrt (see the top of this file).
ARG FLAVOR=pytorch
# Extra `clipsvc export` flags, e.g. "--max-batch-size 64 --instances 2".
ARG EXPORT_ARGS=""

# The cache mount keeps downloaded weights across rebuilds without putting them in a
# layer; the bind mount exposes the build context at /ctx, so PRETRAINED=/ctx/demo/<file>
# exports a local checkpoint without copying it into the image.
# EXPORT_ARGS stays unquoted on purpose: it is split into separate flags.
# FLAVOR becomes the export flags and the file every tower must then hold.
RUN --mount=type=cache,target=/root/.cache \
    --mount=type=bind,source=.,target=/ctx \
    case "${FLAVOR}" in \
        pytorch) set -- --flavor pytorch; model_file=model.pt ;; \
        onnx) set -- --flavor onnx; model_file=model.onnx ;; \
        onnx-tensorrt) set -- --flavor onnx --tensorrt; model_file=model.onnx ;; \
        *) echo "FLAVOR must be pytorch, onnx or onnx-tensorrt, not '${FLAVOR}'" >&2; exit 1 ;; \
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
# backend=triton; the weights (model.pt or model.onnx) only with backend=embedded. Drop
# them otherwise so the gateway image does not carry hundreds of MB it never reads.
FROM export AS gateway-models
ARG GATEWAY_BACKEND=triton
RUN if [ "${GATEWAY_BACKEND}" != "embedded" ]; then \
        find /export \( -name model.pt -o -name 'model.onnx*' \) -delete; \
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

COPY --from=builder /opt/venv /opt/venv
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
