# The commands a person types; CI and the GitHub workflows call the same targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.9
BOOTSTRAP := .uv-bootstrap
UV := $(BOOTSTRAP)/bin/uv
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

# Values a person or a workflow passes (make flow FLOW_ARGS=..., a workflow_dispatch input) are data, never code:
# `override X := $(value X)` freezes their raw text, so make expands no $(...) inside them (neither on use nor
# on export), and recipes hand them to the shell single-quoted ($(call quote,X)), so the shell runs no $(...),
# `...` or ; inside them either. Argument lists (FLOW_ARGS, SMOKE_ARGS) are split on whitespace, unglobbed.
USER_VARS := FLOW_ARGS SMOKE_ARGS URL ENV TAG IMAGE PIPELINE_IMAGE BASE_IMAGE BAKE_MODEL SERVE_MODEL_URI PORT
$(foreach v,$(USER_VARS),$(if $(filter command line environment,$(origin $(v))),$(eval override $(v) := $$(value $(v)))))
quote = '$(subst ','\'',$($(1)))'

# Under CI (CI=true: GitHub Actions, .ci/run) a tool the tests need that cannot be installed (Docker, Chromium,
# Prometheus) fails the run: its tests would otherwise be skipped and the run pass without them. Elsewhere the
# tests skip and say why.
IS_CI = case "$${CI:-}" in 1 | [Tt]rue | [Yy]es) true ;; *) false ;; esac

# The data source: $DATA_SOURCE (make run DATA_SOURCE=path-or-url) overrides params.yaml's data.source.
# Where the shared development sample sits beside the project (these machines, CI) it is the default,
# so `make run` works offline; elsewhere params.yaml's source (Microsoft's published zip) is used.
SAMPLE := ../shared/datasets/cats_vs_dogs_sample
ifeq ($(origin DATA_SOURCE),undefined)
  ifneq ($(wildcard $(SAMPLE)/PetImages),)
    DATA_SOURCE := $(SAMPLE)
  endif
endif
export DATA_SOURCE

# The service `make serve` / `make run` start: the registry's champion from the local MLflow store, unless set.
PORT ?= 8000
export PORT
SERVE_MODEL_URI ?= models:/catdog@champion
STOP_SERVICE = if [ -f .serve.pid ]; then kill $$(cat .serve.pid) 2>/dev/null || true; rm -f .serve.pid; fi
SERVE_ENV = default_uri=$(call quote,SERVE_MODEL_URI); MODEL_URI="$${MODEL_URI:-$$default_uri}" \
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}"

.PHONY: help install browser prometheus run flow flow-serve flow-watch promote rollback audit smoke serve serve-bg stop test lint \
	format mlflow-ui docker docker-stop image image-pipeline up down lint-deploy deploy

# Containers (docker/README.md). `make image` builds IMAGE:TAG, `make image-pipeline` PIPELINE_IMAGE:TAG (CI: the
# ghcr.io repository and the git SHA);
# BASE_IMAGE: their base (default the Dockerfiles' official python tag; catdog-base:bookworm is the local one
# `make docker` makes where Docker Hub cannot be reached); BAKE_MODEL: a folder (e.g. models) baked into the
# serving image's /models. BuildKit when buildx is installed, else the classic builder.
IMAGE ?= catdog-api
PIPELINE_IMAGE ?= catdog-pipeline
TAG ?= dev
BASE_IMAGE ?=
BAKE_MODEL ?=
ENGINE := bash scripts/docker_engine.sh
BUILDKIT = DOCKER_BUILDKIT=$${DOCKER_BUILDKIT:-$$(docker buildx version >/dev/null 2>&1 && echo 1 || echo 0)}
DOCKER_BUILD = $(BUILDKIT) docker build $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(call quote,BASE_IMAGE))
COMPOSE = $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo "$(BIN)/docker-compose")

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(UV):
	@echo "Installing uv $(UV_VERSION) into $(BOOTSTRAP)/"
	@if $(PYTHON) -m venv $(BOOTSTRAP) >/dev/null 2>&1; then \
		$(BOOTSTRAP)/bin/python -m pip install -q "uv==$(UV_VERSION)"; \
	else \
		rm -rf $(BOOTSTRAP) && $(PYTHON) -m pip install -q --target $(BOOTSTRAP)/lib "uv==$(UV_VERSION)" && \
		mkdir -p $(BOOTSTRAP)/bin && ln -sf ../lib/bin/uv $(UV); \
	fi

install: $(UV) ## Create .venv from uv.lock (idempotent)
	@$(UV) sync --frozen --all-extras --quiet
	@echo "venv ready: $(VENV) ($$($(BIN)/python --version))"

run: install ## Pipeline (dvc repro, registers @challenger) -> promote to @champion -> service on :8000
	@echo "data source: $${DATA_SOURCE:-params.yaml data.source}"
	@start=$$(date +%s); dvc repro && python -m catdog promote && python -m catdog summary && \
		echo "pipeline finished in $$(( $$(date +%s) - start ))s"
	@$(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) serve-bg

flow: install ## The pipeline as a Prefect flow: a task per DVC stage, retries, alerts, promote (FLOW_ARGS=...)
	@set -f; args=$(call quote,FLOW_ARGS); echo "python -m flows run $$args"; python -m flows run $$args

flow-serve: install ## Serve the Prefect deployments: weekly retraining, data-change trigger, manual runs
	python -m flows serve

flow-watch: install ## The data-change trigger once: the flow runs only when the data source changed
	python -m flows watch

promote: install ## Gate @challenger (metrics, no regression, schema, latency, staging smoke) into @champion
	python -m catdog promote

rollback: install ## Point @champion back at @previous (a serving service follows)
	python -m catdog rollback

audit: install ## Every alias move of the registered model, oldest first
	python -m catdog audit

serve: install ## The prediction service in the foreground on PORT (8000), serving MODEL_URI (default @champion)
	$(SERVE_ENV) $(BIN)/python -m api

serve-bg: install ## The service in the background (log reports/serve.log, pid .serve.pid); waits until ready
	@$(STOP_SERVICE)
	@mkdir -p reports
	@$(SERVE_ENV) nohup $(BIN)/python -m api > reports/serve.log 2>&1 & echo $$! > .serve.pid
	@$(BIN)/python -c "import os, sys; from catdog.smoke import wait_ready; port = os.environ['PORT']; \
		ok, why = wait_ready(f'http://127.0.0.1:{port}', 120); \
		print(f'service ready on http://localhost:{port} ({why}); make stop ends it' if ok else f'service not ready: {why} (see reports/serve.log)'); \
		sys.exit(0 if ok else 1)"

# make smoke URL=...: one script for every deployed service (compose, staging, production, CD). By default one
# test image per class that the evaluation labelled right (after `dvc repro` or `dvc pull`); SMOKE_ARGS overrides.
# Needs only Python and prometheus-client: the project's venv when there is one, else $(PYTHON).
SMOKE_ARGS ?= --predictions reports/evaluate/predictions.csv --processed data/processed --per-class 1
SMOKE_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
smoke: ## Smoke-test a running service: make smoke URL=http://host:8000 (health, ready, labels, metrics)
	@if [ -z $(call quote,URL) ]; then echo "usage: make smoke URL=http://host:8000 [SMOKE_ARGS='--images DIR']" >&2; exit 2; fi
	@set -f; args=$(call quote,SMOKE_ARGS); set -x; \
		PYTHONPATH=$(CURDIR)/src $(SMOKE_PYTHON) -m catdog.smoke $(call quote,URL) $$args

stop: ## Stop the background service
	@$(STOP_SERVICE)

mlflow-ui: install ## Browse the local MLflow store (runs, metrics, artifacts, models) on port 5000
	mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

browser: ## Install Chromium for the web page's browser test (apt-get; a no-op when /usr/bin/chromium exists)
	@APT="env DEBIAN_FRONTEND=noninteractive apt-get"; PKGS="chromium chromium-driver"; \
	missing() { if $(IS_CI); then echo "browser: $$1: CI=true, so this fails the run" >&2; exit 1; fi; \
		echo "browser: $$1: the page test is skipped"; exit 0; }; \
	if [ -x /usr/bin/chromium ]; then :; \
	elif ! command -v apt-get >/dev/null; then missing "no apt-get here; install Chromium yourself"; \
	else \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else missing "Chromium missing and neither root nor sudo"; fi; \
		echo "Installing Chromium with apt-get"; \
		$$SUDO $$APT install -y -qq $$PKGS >/dev/null 2>&1 || { $$SUDO $$APT update -qq && $$SUDO $$APT install -y -qq $$PKGS >/dev/null; } \
			|| missing "apt-get could not install Chromium"; \
	fi

prometheus: ## Install Debian's prometheus package (promtool, prometheus) for the monitoring tests
	@bash scripts/install_prometheus.sh

test: install browser prometheus docker ## Lint, then the whole test suite (unit, integration, e2e)
	$(BIN)/ruff check .
	$(BIN)/pytest || [ $$? -eq 5 ]

docker: ## Install Docker + debootstrap (apt-get), start dockerd, make the local base image (catdog-base:bookworm)
	@$(ENGINE) all || { if $(IS_CI); then echo "docker: the container engine is not ready: CI=true, so this fails the run" >&2; exit 1; fi; \
		echo "docker: the container engine is not ready here: the container tests are skipped"; }

docker-stop: ## Stop the dockerd that `make docker` started (not a system-managed engine)
	@$(ENGINE) stop

image: ## Build the serving image IMAGE:TAG (catdog-api:dev; BASE_IMAGE=..., BAKE_MODEL=models bakes the model in)
	@$(ENGINE) start >/dev/null
	$(DOCKER_BUILD) $(if $(BAKE_MODEL),--build-arg MODEL_DIR=$(call quote,BAKE_MODEL)) -t $(call quote,IMAGE):$(call quote,TAG) -f Dockerfile .
	@ref=$(call quote,IMAGE):$(call quote,TAG); docker image inspect -f '{{.Size}}' "$$ref" | awk -v ref="$$ref" '{printf "%s: %.0f MB\n", ref, $$1 / 1e6}'

image-pipeline: ## Build the pipeline image PIPELINE_IMAGE:TAG (catdog-pipeline:dev; BASE_IMAGE=nvidia/cuda:... for GPUs)
	@$(ENGINE) start >/dev/null
	$(DOCKER_BUILD) -t $(call quote,PIPELINE_IMAGE):$(call quote,TAG) -f docker/pipeline.Dockerfile .

up: ## The compose stack (api, api-staging, mlflow, prefect, prometheus, grafana...) in the background
	@$(ENGINE) start >/dev/null
	$(BUILDKIT) $(if $(BASE_IMAGE),BASE_IMAGE=$(call quote,BASE_IMAGE)) $(COMPOSE) up --detach
	$(COMPOSE) ps

down: ## Stop and remove the compose stack's containers (its named volumes, the data, are kept)
	$(COMPOSE) down

lint-deploy: install ## Lint the Dockerfiles, workflows, compose file, Kubernetes overlays and scripts
	bash scripts/lint_deploy.sh

deploy: ## Deploy to Kubernetes: make deploy ENV=staging|production TAG=<git sha> (apply, rollout, smoke, rollback)
	@if [ -z $(call quote,ENV) ] || [ -z $(call quote,TAG) ] || [ "$(origin TAG)" = file ]; then \
		echo "usage: make deploy ENV=staging|production TAG=<image tag>" >&2; exit 2; fi
	bash scripts/deploy.sh $(call quote,ENV) $(call quote,TAG)

lint: install ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
