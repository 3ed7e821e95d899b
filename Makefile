# `make repro` and `make test` work on a fresh clone: they build .venv when it is missing or
# older than the pins, then run the pipeline or the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
PORT ?= 5000

MODEL ?= models:/lmpipe-classifier/latest

.PHONY: setup repro test lint format compare ui serve serve-mlflow bench study study-objectives toolbox chaos clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@$(BIN)/python -c "import sys; assert sys.version_info[:2] == (3, 11)" 2>/dev/null \
	  || (rm -rf $(VENV) && $(PYTHON) -m venv $(VENV))
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

repro: setup
	LMPIPE_RUN_GROUP=$${LMPIPE_RUN_GROUP:-repro-$$(date -u +%Y%m%dT%H%M%SZ)} $(BIN)/dvc repro

test: lint
	$(BIN)/python -m pytest tests

# ruff (config in pyproject.toml): lint and formatting, checked by `make test` and CI
PY_SOURCES := lmpipe stages tests bench studies
lint: setup
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/ruff format --check $(PY_SOURCES)

format: setup
	$(BIN)/ruff check --fix $(PY_SOURCES)
	$(BIN)/ruff format $(PY_SOURCES)

# one row per pipeline run (make repro, dvc exp run): the params that differ, the headline with CIs
compare: setup
	$(BIN)/lmpipe compare $(COMPARE_ARGS)

# the MLflow UI on the project's store; first prints the address of its runs table (MLflow 3.17
# opens an experiment on its GenAI overview otherwise)
ui: setup
	-@$(BIN)/lmpipe ui-url --port $(PORT) --tracking-uri sqlite:///$(CURDIR)/mlflow.db | sed 's/^/MLflow runs table: /'
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(PORT) --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlartifacts

# models/export over HTTP on 127.0.0.1:8000 (token: LMPIPE_SERVE_TOKEN; flags: SERVE_ARGS); README "Serve it"
SERVE_ARGS ?=
serve: setup
	$(BIN)/lmpipe serve --host 127.0.0.1 $(SERVE_ARGS)

# the registered model through MLflow's own server (no token, no limits, no batching), for comparison
serve-mlflow: setup
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
	  $(BIN)/mlflow models serve -m $(MODEL) --env-manager local --host 127.0.0.1 --port $(PORT)

bench: setup
	$(BIN)/python -m bench.run

# When does pretraining pay? Pretraining budgets x label counts, pretrained vs random init
# (~30 min on 2 cores). Writes reports/study/.
STUDY_ARGS ?=
study: setup
	$(BIN)/dvc repro tokenize
	$(BIN)/python -m studies.pretraining_payoff $(STUDY_ARGS)

# Fine-tuning methods side by side: one `dvc exp run --temp evaluate -S ...` per method on the
# default data and budget (~25 min on 2 cores, after `make repro`). Writes reports/toolbox/.
TOOLBOX_ARGS ?=
toolbox: setup
	$(BIN)/python -m studies.toolbox $(TOOLBOX_ARGS)

# Masked-LM encoder against causal-LM decoder at equal pretraining compute: one `dvc exp run --temp
# evaluate -S ...` per arm (~75 min on 2 cores, after `make repro`). Writes reports/study/objectives.*
OBJECTIVES_ARGS ?=
study-objectives: setup
	$(BIN)/python -m studies.objectives $(OBJECTIVES_ARGS)

# SIGKILL `dvc repro` of the tiny test DAG at seeded points of training, rerun, compare every
# model's md5 with an uninterrupted run (~10 min on 2 cores); tests/integration/chaos.py
CHAOS_ARGS ?=
chaos: setup
	$(BIN)/python -m tests.integration.chaos $(CHAOS_ARGS)

clean-venv:
	rm -rf $(VENV)
