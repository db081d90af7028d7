# Passerelle — the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= routing.yaml

.PHONY: all venv demo run test lint typecheck unit system-deps faults fuzz bench bench-deps clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian tools the tests use as independent peers (openssl, gpg, swaks, Postfix), installed only if
# missing. Postfix's `postconf` checks the compose peers' main.cf; it is also the bench baseline.
system-deps:
	@missing=""; \
	for tool in openssl:openssl gpg:gnupg swaks:swaks postconf:postfix; do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: $(STAMP)
	$(BIN)/gateway demo -c $(CONFIG)

run: $(STAMP)
	$(BIN)/gateway serve -c $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check gateway adapters tests

typecheck: $(STAMP)
	$(BIN)/mypy --strict gateway adapters

test: $(STAMP) system-deps lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider

# The long fault runs: 20 SIGKILLs under load (3 in `make test`), every fault scenario.
faults: $(STAMP) system-deps
	PASSERELLE_LONG=1 $(BIN)/pytest -q -p no:cacheprovider -s tests/faults

# The fuzzers with thousands of examples per property (a few dozen in `make test`).
fuzz: $(STAMP) system-deps
	HYPOTHESIS_PROFILE=long $(BIN)/pytest -q -p no:cacheprovider tests/fuzz

# Postfix is the plain route's baseline and gives the sink (smtp-sink); installed if missing.
bench-deps: system-deps
	@if ! command -v smtp-sink >/dev/null 2>&1; then \
	  echo "installing: postfix (benchmark baseline and sink)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postfix >/dev/null; \
	fi

# The `bench` extra (matplotlib, for bench/scaling.png), installed once into the venv.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# Every system on the same load and sinks, in one run (~15 min): throughput, scaling, latency,
# memory, a 100,000-message backlog and profiles, into BENCHMARKS.md and bench/scaling.png.
bench: $(STAMP) $(BENCH_STAMP) bench-deps
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache var demo-run
