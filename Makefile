# The two commands a newcomer needs: `make demo` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: demo test lint bench chaos install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(BIN)/python
	$(PIP) install --quiet -e .

install-test: $(BIN)/python
	$(PIP) install --quiet -e '.[dev]'

## the main job on the embedded default: in-memory broker + SQLite ledger
demo: install
	$(BIN)/replaysafe demo

## the whole suite (installs test dependencies first)
test: install-test
	$(BIN)/python -m pytest

## ruff + mypy --strict on src
lint: install-test
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

## benchmarks: ratios measured side by side in one run, JSON in bench/results/
bench: install-test
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

## the full chaos matrix (>= 10,000 operations) on the memory broker and the local RabbitMQ;
## JSON and HTML under chaos-results/ (SQS and Kafka need --broker-url of a running server:
## `pytest -m slow tests/test_chaos.py` starts moto and Tansu itself)
chaos: install-test
	mkdir -p chaos-results
	$(BIN)/python -m replaysafe.cli chaos --broker memory --cells default --ops 10000 \
		--json chaos-results/memory.json --html chaos-results/memory.html
	$(BIN)/python -m replaysafe.cli chaos --broker rabbitmq --cells default --ops 10000 \
		--json chaos-results/rabbitmq.json --html chaos-results/rabbitmq.html

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
