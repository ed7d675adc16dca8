# Every command a person runs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

.PHONY: venv
venv: $(STAMP) ## Create the virtualenv with every Python package

.PHONY: kafka-up
kafka-up: $(STAMP) ## Start the local Kafka broker (idempotent) and create every topic
	deploy/local/kafka.sh up
	$(PY) -m services.runtime.topics --rules $${MAILRAIL_RULES:-deploy/local/rules.yaml}

.PHONY: kafka-down
kafka-down: ## Stop the local Kafka broker
	deploy/local/kafka.sh down

.PHONY: run
run: kafka-up ## Run the whole stack: Kafka, the four services and a local SMTP sink (Ctrl-C stops it)
	$(PY) -m deploy.local.stack

.PHONY: test
test: kafka-up ## Run every test: lint, types, unit and integration (starts Kafka)
	$(MAKE) lint
	$(PY) -m pytest -q tests

.PHONY: test-unit
test-unit: $(STAMP) ## Run the unit tests (no broker)
	$(PY) -m pytest -q tests/unit

.PHONY: test-integration
test-integration: kafka-up ## Run the integration tests (real Kafka, SMTP and DNS on loopback)
	$(PY) -m pytest -q tests/integration

.PHONY: chaos
chaos: kafka-up ## Fault injection at full size (loopback, bounded): lost and duplicated mail per scenario (CHAOS_ARGS="--only 3,4")
	$(PY) -m chaos $(CHAOS_ARGS)

.PHONY: lint
lint: $(STAMP) ## ruff and mypy --strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

.PHONY: fmt
fmt: $(STAMP) ## Format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

.PHONY: schemas
schemas: $(STAMP) ## Regenerate the JSON Schema files under schemas/jsonschema/
	$(PY) -m schemas.generate

.PHONY: k8s-render
k8s-render: $(STAMP) ## Render every kustomize overlay and component combination and validate it
	deploy/k8s/render.sh

.PHONY: doctor
doctor: $(STAMP) ## Check DOMAIN's SPF, DKIM, DMARC, bounce MX and PTR (DOCTOR_ARGS="--dns h:p ...")
	@test -n "$(DOMAIN)" || { echo "usage: make doctor DOMAIN=example.com [DOCTOR_ARGS='--pool-ip IP ...']"; exit 2; }
	$(PY) -m services.doctor $(DOMAIN) $(DOCTOR_ARGS)

.PHONY: bench
bench: kafka-up ## Run the benchmarks (results under bench/results/)
	$(PY) -m bench

.PHONY: bench-quick
bench-quick: kafka-up ## Benchmark sanity run with small N (under 3 minutes)
	$(PY) -m bench --quick

.PHONY: bench-soak
bench-soak: kafka-up ## Soak at 50% load: memory growth of every service (SOAK_S=120: 2 minutes)
	$(PY) -m bench --soak --soak-s $${SOAK_S:-1800}

.PHONY: clean
clean: kafka-down ## Stop Kafka and delete local data and the virtualenv
	rm -rf deploy/local/data deploy/local/run $(VENV)
