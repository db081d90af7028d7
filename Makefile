# Passerelle — the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= routing.yaml

.PHONY: all venv demo run test lint typecheck unit system-deps faults fuzz bench clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian tools the tests use as independent peers (openssl, gpg, swaks); installed only if missing.
system-deps:
	@missing=""; \
	for tool in openssl:openssl gpg:gnupg swaks:swaks; do \
	  command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool##*:}"; \
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

faults: $(STAMP) system-deps
	PASSERELLE_LONG=1 $(BIN)/pytest -q tests/faults

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache var demo-run
