# One entry point for people and CI. `make plan` and `make test` work on a fresh Debian machine:
# they install the Debian packages and the Python environment they need first.
SHELL := /bin/bash
VENV ?= .venv
# Debian's own Python when there is one: a service account can run it (a pyenv under /root cannot),
# so the dev platform's worker drops root like the other processes.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
BIN := $(VENV)/bin
STACK ?= dev
# Real servers the integration tests start themselves (never mocked): see localdev/servers.py.
DEBIAN_PACKAGES := mosquitto mosquitto-clients postgresql victoria-metrics prometheus openssl python3-venv
# ps and ss, which pytest-testinfra's process and socket checks run (tests/infra/).
DEBIAN_PACKAGES += procps iproute2
# graphviz's dot: `ironlink plan --graph` and the pictures of docs/architecture.md (infra/graph.py).
DEBIAN_PACKAGES += graphviz

.PHONY: deps system-deps plan plan-all test lint bench clean

deps: system-deps $(VENV)/.installed

system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages: $$missing (run: sudo apt-get install $$missing)"; exit 1; fi; \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,edge]'
	touch $@

plan: $(VENV)/.installed
	$(BIN)/ironlink plan $(STACK)

plan-all: $(VENV)/.installed
	$(BIN)/ironlink plan --all

# Lint first (ruff + mypy are part of the bar), then every test, real servers included.
test: deps lint
	$(BIN)/pytest -n 2 --dist loadgroup -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy infra components ingest dashboards registry localdev provisioning edge backup api

.PHONY: demo
# Phase A end to end on this machine (localdev/demo.py): `ironlink dev up`, ~20 s of simulated
# telemetry from every machine of $(STACK), what landed per tenant, then `ironlink dev down`.
# KEEP=1 leaves the platform running; DEMO_SECONDS changes the simulation's length; STATE_DIR
# moves the platform's folder (its servers' accounts must be able to enter it).
DEMO_SECONDS ?= 20
STATE_DIR ?= .ironlink/dev
demo: deps
	$(BIN)/python -m localdev.demo --stack $(STACK) --state-dir $(STATE_DIR) --duration $(DEMO_SECONDS) $(if $(KEEP),--keep)

.PHONY: docs-graphs
# Regenerate the pictures docs/architecture.md shows (tests/test_graph.py checks they are current).
docs-graphs: deps
	$(BIN)/python -m infra.graph --output-dir docs/graphs

.PHONY: ingest-schemas ingest-image
# Regenerate ingest/schemas/*.json from the payload models (tests/test_contract_schemas.py checks them).
ingest-schemas: $(VENV)/.installed
	$(BIN)/python -m ingest.jsonschema

# The worker's image (needs a Docker daemon): what the IngestWorker component deploys.
INGEST_IMAGE ?= ghcr.io/ironlink/ingest:0.1.0
ingest-image:
	docker build -f ingest/Dockerfile -t $(INGEST_IMAGE) .

bench: deps
	$(BIN)/python bench/plan.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/edge.py
	$(BIN)/python bench/usage.py

clean:
	rm -rf build .ironlink
