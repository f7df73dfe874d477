# EdgeLLM Testbed.  `make demo` and `make test` install whatever is missing first.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
TB := $(VENV)/bin/testbed
TOPO ?= topologies/device-edge-cloud.yaml
SUITE ?= experiments/quick.yaml
SHAPER ?= auto
PYTEST_ARGS ?=

.PHONY: deps test test-quick demo up clean bench bench-deps images experiment lint

deps:
	@bash vagrant/provision.sh "$(CURDIR)"

test: deps
	$(PY) -m pytest -ra --durations=15 $(PYTEST_ARGS)

test-quick: deps  ## unit tests only: no namespaces, no real model
	$(PY) -m pytest -ra -m "not slow" $(PYTEST_ARGS)

demo: deps
	$(TB) demo --topo $(TOPO) --shaper $(SHAPER)

up: deps
	$(TB) up $(TOPO) --shaper $(SHAPER)

clean:
	@if [ -x $(TB) ]; then $(TB) clean; else echo "nothing to clean (no venv)"; fi

bench: deps
	$(PY) bench/run_all.py

bench-deps:  ## also build llama-cpp-python (~10 min) for bench/llama_anchor.py
	@TESTBED_WITH_LLAMA_CPP=1 bash vagrant/provision.sh "$(CURDIR)"

images: deps
	$(TB) images

experiment: deps
	$(TB) run $(SUITE)

lint: deps
	$(VENV)/bin/ruff check --no-cache testbed nodes tests bench
