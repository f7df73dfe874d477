# EdgeLLM Testbed.  `make demo` and `make test` install whatever is missing first.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
TB := $(VENV)/bin/testbed
TOPO ?= topologies/device-edge-cloud.yaml
SUITE ?= experiments/quick.yaml
SHAPER ?= auto
PYTEST_ARGS ?=

.PHONY: deps test test-quick test-guest demo up clean bench bench-deps images experiment lint \
	wheelhouse vm-box vm-up vm-test vm-destroy

deps:
	@bash vagrant/provision.sh "$(CURDIR)"

test: deps
	$(PY) -m pytest -ra --durations=15 $(PYTEST_ARGS)

test-quick: deps  ## unit tests only: no namespaces, no real model
	$(PY) -m pytest -ra -m "not slow" $(PYTEST_ARGS)

test-guest: deps  ## netem + cgroup v2 tests in Debian's kernel under QEMU (TCG, no KVM needed; ~6-9 min)
	bash vagrant/guest/run.sh "$(CURDIR)" "$(PY)"

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

# --- the Vagrant VM (see README, "Running in a VM") ------------------------------------------
wheelhouse: deps  ## every pinned Python package as a wheel, for provision.sh without an index
	bash vagrant/wheelhouse.sh "$(CURDIR)" "$(PY)"

vm-box:  ## build the debian/bookworm64 box offline from Debian packages and register it (~4 min)
	bash vagrant/box/build.sh

vm-up: wheelhouse vm-box  ## bring the VM up under libvirt (KVM where it can run a guest, else TCG)
	bash vagrant/box/vm.sh up

vm-test:  ## inside the VM: the kernel-backend tests, the quick suite, make test-quick; results to out/vm/ (~100 min under TCG)
	bash vagrant/box/vm.sh test

vm-destroy:  ## remove the VM, its volumes, and the libvirt daemons this Makefile started
	bash vagrant/box/vm.sh destroy
