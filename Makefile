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
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

## benchmarks: ratios measured side by side in one run, JSON in bench/results/
bench: install-test
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

## the full chaos matrix on every broker: memory (10,000 operations per run), then the local
## RabbitMQ and throwaway moto (SQS) and Tansu (Kafka) servers it starts and stops itself, at 500
## operations per run: over their 20-24 cells that is 10,000-12,000 operations per broker (a fault
## hits 4% of a run's operations, and each crash on Kafka costs a rebalance of about 7 s, so 10,000
## per run would take hours per cell there). JSON and HTML per broker under chaos-results/.
## About two hours on a 2-core machine; CHAOS_OPS=100 CHAOS_OPS_MEMORY=1000 for a quick one.
CHAOS_OPS ?= 500
CHAOS_OPS_MEMORY ?= 10000
chaos: install-test
	mkdir -p chaos-results
	@failed=""; for b in memory rabbitmq sqs kafka; do \
		ops=$(CHAOS_OPS); if [ $$b = memory ]; then ops=$(CHAOS_OPS_MEMORY); fi; \
		echo "== chaos $$b ($$ops operations per run)"; \
		$(BIN)/replaysafe chaos --broker $$b --cells default --ops $$ops --run-timeout 1800 \
			--json chaos-results/$$b.json --html chaos-results/$$b.html || failed="$$failed $$b"; \
	done; if [ -n "$$failed" ]; then echo "chaos: pass bar missed on:$$failed"; exit 1; fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
