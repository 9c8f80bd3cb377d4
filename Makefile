# lightclip: the commands that matter. `make install`, `make test`, `make pipeline`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

# Telemetry off and tool homes inside the project (see ../shared/STACK.md).
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1
export GX_ANALYTICS_ENABLED := false
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false
export PREFECT_HOME := $(CURDIR)/.prefect
export DVC_SITE_CACHE_DIR := $(CURDIR)/.cache/dvc-site
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export PIP_DISABLE_PIP_VERSION_CHECK := 1

MLFLOW_PORT ?= 5000
PREFECT_PORT ?= 4200

.PHONY: help install venv data data-update test pipeline plots mlflow-ui clean chromium

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

venv: $(BIN)/lightclip

$(BIN)/lightclip: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: venv data chromium ## create .venv with the pinned stack, materialise the default catalogue, get Chromium

# Chromium renders the offline plots page in the tests and takes the MLflow UI screenshots. As
# root on Debian (CI) apt-get installs it when /usr/bin/chromium is missing (a failure is reported,
# not fatal: the rest of the install stands); without root or apt-get this says how, and the
# browser tests skip with that reason.
chromium: ## install Debian's chromium when /usr/bin/chromium is missing (apt-get, as root)
	@if [ -x /usr/bin/chromium ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "chromium is missing: install it (Debian: sudo apt-get install -y chromium); the browser tests skip until then" >&2; exit 0; \
	fi; \
	echo "installing chromium (apt-get)"; mkdir -p .cache; \
	export DEBIAN_FRONTEND=noninteractive; \
	if ! { apt-get update -qq && apt-get install -y -qq chromium; } >.cache/apt-chromium.log 2>&1; then \
	  echo "apt-get install chromium failed (see .cache/apt-chromium.log): the browser tests will fail until it is installed" >&2; \
	fi

data: venv ## get data/raw: dvc pull when the remote has it, else regenerate it bit-for-bit
	@if [ -n "$$($(BIN)/dvc status data.dvc --json 2>/dev/null | tr -d '{} \n')" ] || [ ! -d data/raw ]; then \
	  if $(BIN)/dvc pull -q data.dvc 2>/dev/null; then echo "data/raw pulled from the DVC remote"; \
	  else \
	    echo "DVC remote has no copy: regenerating data/raw (lightclip data synth)"; \
	    rm -rf data/raw; $(BIN)/lightclip -q data synth --out data/raw; \
	    cp data.dvc .dvc/tmp/data.dvc.expected; \
	    $(BIN)/dvc commit -f -q data.dvc; \
	    if ! cmp -s data.dvc .dvc/tmp/data.dvc.expected; then \
	      mv .dvc/tmp/data.dvc.expected data.dvc; \
	      echo "regenerated data/raw does not match data.dvc (different synth params or versions?)" >&2; exit 1; \
	    fi; \
	  fi; \
	fi
	@status="$$($(BIN)/dvc status data.dvc --json | tr -d '{} \n')"; \
	if [ -n "$$status" ]; then echo "data/raw does not match data.dvc: $$status" >&2; exit 1; fi; \
	echo "data/raw matches data.dvc"

data-update: venv ## after changing params.yaml `synth:`: regenerate data/raw and record it in data.dvc
	rm -rf data/raw
	$(BIN)/lightclip data synth --out data/raw
	$(BIN)/dvc commit -f -q data.dvc
	$(BIN)/dvc push -q data.dvc || echo "dvc push failed: the remote is not reachable"

test: ## run the test suite
	$(BIN)/python -m pytest -q

pipeline: ## run the whole pipeline on the embedded default (dvc repro inside one MLflow parent run)
	$(BIN)/lightclip pipeline

plots: ## the DVC plots of dvc.yaml as one offline page, reports/plots.html (REV=HEAD~1 compares, as dvc plots diff)
	$(BIN)/lightclip plots $(if $(REV),--rev $(REV))

mlflow-ui: ## serve the project's MLflow store on 127.0.0.1:$(MLFLOW_PORT)
	$(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) \
	  --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db \
	  --default-artifact-root file://$(CURDIR)/mlflow/artifacts

.PHONY: prefect-server serve retrain

# The UI asks the server for its API URL (GET /ui-settings), which Prefect builds from
# PREFECT_SERVER_API_PORT (4200), not from --port: set it, and the links' base, from PREFECT_PORT.
prefect-server: ## Prefect server (UI + API) on http://127.0.0.1:$(PREFECT_PORT), state in .prefect/
	PREFECT_SERVER_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api PREFECT_UI_URL=http://127.0.0.1:$(PREFECT_PORT) \
	  $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

serve: ## serve the deployment retrain/scheduled (cron: params.yaml orchestration) on that server
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/python pipelines/deploy.py

retrain: ## run the retraining flow once (Prefect; on the server of `make prefect-server` when it is up)
	PREFECT_PORT=$(PREFECT_PORT) $(BIN)/python pipelines/retrain.py

.PHONY: services-up services-down services-status

# The team deployment (docs/team.md): state, logs and the generated team.env in .services/ (git-ignored).
services-up: ## start PostgreSQL, S3 (SeaweedFS), MLflow + Prefect servers and 2 workers on 127.0.0.1 (idempotent)
	$(BIN)/lightclip services up

services-down: ## stop the team services (their data stays in .services/)
	$(BIN)/lightclip services down

services-status: ## list the team services with their URLs
	$(BIN)/lightclip services status

.PHONY: deploy-pool

# The flow on the team's work pool (pipelines/README.md): each run on one of its workers, in a git worktree of its own.
deploy-pool: ## deploy retrain/pool (cron: params.yaml orchestration) to the pool of `make services-up`
	[ ! -f .services/team.env ] || . ./.services/team.env; $(BIN)/python pipelines/deploy_pool.py

clean: ## remove pipeline outputs (not the venv, not data/raw, not the MLflow store)
	rm -rf data/validated data/split reports .pytest_cache
