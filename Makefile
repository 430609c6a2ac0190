# The README's two set-up commands are `make baseline` and `make test`; each creates .venv and
# installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on local disk here; an unpinned torch would download a CUDA build.
TORCH_SPEC ?= torch==2.13.0
INSTALLED := $(VENV)/.installed

.PHONY: help install test test-fast lint format baseline capacity compare-quant serve refserver calibrate client-capacity clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH_SPEC)'
	$(BIN)/python -m pip install --quiet -e '.[dev,cluster]'
	touch $@

install: $(INSTALLED)  ## Create .venv and install the project with its dev tools

lint: $(INSTALLED)  ## ruff (lint + format check) and mypy
	$(BIN)/ruff check bench runtime tests benchmarks
	$(BIN)/ruff format --check bench runtime tests benchmarks
	$(BIN)/mypy bench runtime

format: $(INSTALLED)  ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix bench runtime tests benchmarks
	$(BIN)/ruff format bench runtime tests benchmarks

test: lint  ## Lint, then the whole test suite (fast tests first, then the slow end-to-end ones)
	fast=0; slow=0; \
	$(BIN)/python -m pytest -m 'not slow' -q || fast=$$?; \
	$(BIN)/python -m pytest -m slow -q || slow=$$?; \
	echo "pytest exit status: fast tests $$fast, slow tests $$slow"; \
	test $$fast -eq 0 && test $$slow -eq 0

test-fast: $(INSTALLED)  ## Only the fast tests
	$(BIN)/python -m pytest -m 'not slow' -q

baseline: $(INSTALLED)  ## The standard scenarios on the bundled engine (tiny), kept as baseline `main`
	$(BIN)/python -m bench -m scenario=short_qa,long_generation,concurrency target=bundled \
		baseline.save=main

capacity: $(INSTALLED)  ## The most users the bundled engine (tiny) serves with TTFT p99 <= 2 s
	$(BIN)/python -m bench scenario=capacity target=bundled slo.ttft_ms=2000

# Interleaved A/B (A B B A ...) on this machine: the float build against the int8 one.
QUANT ?= int8
compare-quant: $(INSTALLED)  ## The bundled engine float vs int8 (QUANT=int4), interleaved, with a report
	$(BIN)/python -m bench.compare interleave.rounds=5 \
		'interleave.common=[scenario=concurrency,target=bundled,"scenario.concurrency=[1,8]",scenario.num_requests=16]' \
		'interleave.candidate=[runtime.quantization=$(QUANT)]' report=reports/quant-$(QUANT)

serve: $(INSTALLED)  ## Serve the bundled engine (tiny) on 127.0.0.1:8000
	$(BIN)/python -m runtime serve --model tiny

refserver: $(INSTALLED)  ## Serve the reference token schedule on 127.0.0.1:8000
	$(BIN)/python -m bench.refserver

calibrate: $(INSTALLED)  ## Measure the harness's own timing error against the reference server
	$(BIN)/python -m bench.calibrate

client-capacity: $(INSTALLED)  ## How many streams one and two client workers sustain before their lag exceeds 1 ms
	$(BIN)/python benchmarks/client_capacity.py --workers 1 2 --users 32 64 96 112 128 160

clean:  ## Remove the virtual environment and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
