# Every target builds its own virtual environment first; nothing is installed outside .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: venv lint types test test-storage demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench

types: $(STAMP)
	$(BIN)/mypy

## make test: lint, strict types and the whole test suite (a real PostgreSQL; embedded when none is given)
test: lint types
	$(BIN)/pytest $(PYTEST_ARGS)

## make test-storage: the storage tests again, against MHC_TEST_DATABASE_URL
test-storage: $(STAMP)
	$(BIN)/pytest -m "storage and not chaos" $(PYTEST_ARGS)

## make chaos: kill -9 while draining (one room, twenty rooms), real PostgreSQL stops, an API fault storm, hostile
## answers; prints exact counts (~12 min)
chaos: $(STAMP)
	$(BIN)/pytest -s -m chaos $(PYTEST_ARGS)

## make demo: the daemon against local simulators and a throw-away embedded PostgreSQL (no token, no server)
demo: $(STAMP)
	$(BIN)/mhc-daemon demo $(DEMO_ARGS)

## make bench: the benchmarks, over HTTPS (throughput vs the COPY limit, live latency, memory, start-up, 500
## rooms in one daemon); a table and bench/results.json. BENCH_ARGS=--quick for small sizes, --plain-http
## without TLS, --database-url URL for a server of your own.
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist .mypy_cache .pytest_cache .ruff_cache
