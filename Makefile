# snapfmt -- `make demo` and `make test` do all set-up on a fresh Debian machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
SNAPFMT := $(VENV)/bin/snapfmt
FUZZ_SECONDS ?= 60
APT_PKGS := clang llvm lld libclang-rt-14-dev qemu-system-x86 gcc make
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: all deps venv shim tools generate check-generated test test-py test-c fuzz demo bench goldens clean

all: venv shim tools

# --- set-up -----------------------------------------------------------------
deps: .deps.stamp
.deps.stamp:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@touch $@

venv: $(VENV)/.stamp
$(VENV)/.stamp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@

# --- builds -----------------------------------------------------------------
shim: deps
	$(MAKE) -C shim

tools: deps shim
	@if [ -f tools/guest/Makefile ]; then $(MAKE) -C tools/guest; fi
	@if [ -f tools/harness/Makefile ]; then $(MAKE) -C tools/harness; fi

generate: venv
	$(VPY) -m snapfmt.codegen --out-dir .

check-generated: venv
	$(VPY) -m snapfmt.codegen --check

# --- tests ------------------------------------------------------------------
test: deps venv shim tools check-generated test-c test-py fuzz
	@echo "make test: all passed"

test-py: venv shim tools
	$(VPY) -m pytest -q tests

test-c: deps shim
	$(MAKE) -C shim check

fuzz: deps venv
	$(MAKE) -C shim fuzz FUZZ_SECONDS=$(FUZZ_SECONDS)

# --- goldens, demo, benchmarks ------------------------------------------------
goldens: venv
	$(VPY) tools/make_goldens.py

demo: deps venv shim tools
	@bash tools/demo.sh

bench: deps venv shim tools
	@for b in bench/bench_*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

clean:
	-$(MAKE) -C shim clean
	rm -rf build tools/build bench/out .pytest_cache
