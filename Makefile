# rpcwatch: `make demo` and `make test` work on a fresh machine (Python 3.11, PyPI reachable).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo lint test bench trainticket trainticket-dirty airflow up down lock clean

setup: $(STAMP)

# CPU torch first: an unpinned torch pulls a multi-GB CUDA build. Then the locked set, then us.
$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "rpcwatch needs Python 3.11, got " + sys.version'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	rm -rf $(LAKE) && $(BIN)/python -m pip install --quiet --no-deps --target $(LAKE) $$($(BIN)/python -c $(LAKE_PINS))
	rm -f $(VENV)/.installed-* && touch $@

# The DuckLake overlay (tests/test_ducklake.py): DuckDB 1.4.4 and its ducklake and postgres extensions,
# the pins of pyproject's `ducklake` extra, beside the venv's DuckDB 2.0; PYTHONPATH=$(LAKE) imports them.
LAKE      := $(VENV)/ducklake
LAKE_PINS := 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["ducklake"])'

demo: setup
	$(BIN)/rpcwatch demo

# Lint, format and types first (seconds), then every test.
CODE := tasks dags plugins tests
lint: setup
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python tests/benchmarks/bench_ingest.py

# Real faults: each shared TrainTicket day replayed with a fault-free fill (`replay --fill`: a 6 h
# clean prefix the models learn on, then every capture as taken with resampled fault-free traffic
# between), the pipeline with the demo's settings, then the evaluation against the day's injected
# faults: the ceiling (which faults the spans show), false incidents per day of fill and the
# operating curve. Then the security case studies: six attacks of 2-7 min injected into the fill of
# a copy of the first day's replay (`rpcwatch inject`), run and judged (`evaluate --labels`).
# About 15-20 min on 2 cores; homes under .rpcwatch-trainticket/. `make trainticket-dirty`: the
# back-to-back replay of the captures alone (models learn from fault windows), for comparison.
TT      := ../shared/data/nezha-trainticket
TT_DAYS := 2023-01-29 2023-01-30
TT_HOME := .rpcwatch-trainticket
TT_ENV  := RPCWATCH_FORMAT=spans RPCWATCH_SPAN_MAPPING=nezha-trainticket
trainticket: setup
	for day in $(TT_DAYS); do \
	  home=$(TT_HOME)/$$day; rm -rf $$home; \
	  $(BIN)/rpcwatch replay $(TT)/$$day --out $$home/replay --start $${day}T02:00 --fill && \
	  RPCWATCH_HOME=$$home $(TT_ENV) $(BIN)/rpcwatch run --source $$home/replay && \
	  RPCWATCH_HOME=$$home $(TT_ENV) $(BIN)/rpcwatch evaluate --faults $$home/replay/fault_list.json --ceiling --curve || exit 1; \
	done
	home=$(TT_HOME)/attacks; rm -rf $$home; mkdir -p $$home && \
	  cp -r $(TT_HOME)/2023-01-29/replay $$home/replay && $(BIN)/rpcwatch inject $$home/replay && \
	  RPCWATCH_HOME=$$home $(TT_ENV) $(BIN)/rpcwatch run --source $$home/replay && \
	  RPCWATCH_HOME=$$home $(TT_ENV) $(BIN)/rpcwatch evaluate --labels $$home/replay/labels.parquet

# The "dirty history" variant: captures back to back, the first 35 min train (about 5 min).
trainticket-dirty: setup
	for day in $(TT_DAYS); do \
	  home=$(TT_HOME)/dirty-$$day; rm -rf $$home; \
	  $(BIN)/rpcwatch replay $(TT)/$$day --out $$home/replay --start $${day}T08:25 && \
	  RPCWATCH_HOME=$$home RPCWATCH_MIN_TRAIN_HOURS=0.5 $(TT_ENV) $(BIN)/rpcwatch run --source $$home/replay && \
	  RPCWATCH_HOME=$$home RPCWATCH_MIN_TRAIN_HOURS=0.5 $(TT_ENV) $(BIN)/rpcwatch evaluate --faults $$home/replay/fault_list.json --ceiling --curve || exit 1; \
	done

# Airflow UI on the demo's runs: http://127.0.0.1:8080 (this machine only), stop with Ctrl-C.
# Log in as `admin`; the password is in .rpcwatch/airflow/simple_auth_manager_passwords.json.generated
# (printed at start). AIRFLOW_HOME / AIRFLOW__API__PORT=... in the environment are respected.
airflow: setup
	$(BIN)/rpcwatch airflow standalone

# The local stack, detached: Airflow (scheduler, DAG processor, API server with the rpcwatch view,
# triggerer) on 127.0.0.1:8080 and an MLflow server on 127.0.0.1:5000, both on the home (RPCWATCH_HOME,
# default .rpcwatch); prints the URLs and how to log in. `make down` stops both, nothing left running.
# `make up EXECUTOR=celery`: the CeleryExecutor with two workers (queues default and gpu) instead,
# on the PostgreSQL of AIRFLOW__DATABASE__SQL_ALCHEMY_CONN and the Redis of AIRFLOW__CELERY__BROKER_URL.
EXECUTOR ?= local
up: setup
	$(BIN)/rpcwatch up --executor $(EXECUTOR)

down: setup
	$(BIN)/rpcwatch down

# Re-resolve the lock file from pyproject.toml (after changing dependencies).
lock: setup
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements.lock

clean:
	rm -rf .rpcwatch .rpcwatch-trainticket
