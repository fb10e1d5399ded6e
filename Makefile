# rpcwatch: `make demo` and `make test` work on a fresh machine (Python 3.11, PyPI reachable).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test bench trainticket airflow lock clean

setup: $(STAMP)

# CPU torch first: an unpinned torch pulls a multi-GB CUDA build. Then the locked set, then us.
$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "rpcwatch needs Python 3.11, got " + sys.version'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(BIN)/rpcwatch demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python tests/benchmarks/bench_ingest.py

# Real faults: the shared TrainTicket days replayed back to back, the pipeline on 5 s buckets, then the
# evaluation against the injected faults (about 30 min on 2 cores; home .rpcwatch-trainticket).
TT      := ../shared/data/nezha-trainticket
TT_HOME := .rpcwatch-trainticket
TT_ENV  := RPCWATCH_HOME=$(TT_HOME) RPCWATCH_BUCKET_SECONDS=5 RPCWATCH_MIN_TRAIN_HOURS=0.9 \
           RPCWATCH_FORMAT=spans RPCWATCH_SPAN_MAPPING=nezha-trainticket
trainticket: setup
	rm -rf $(TT_HOME)
	$(BIN)/rpcwatch replay $(TT)/2023-01-29 $(TT)/2023-01-30 --out $(TT_HOME)/replay
	$(TT_ENV) $(BIN)/rpcwatch run --source $(TT_HOME)/replay
	$(TT_ENV) $(BIN)/rpcwatch evaluate --faults $(TT_HOME)/replay/fault_list.json

# Airflow UI on the demo's runs (http://localhost:8080); stop with Ctrl-C.
airflow: setup
	$(BIN)/rpcwatch airflow standalone

# Re-resolve the lock file from pyproject.toml (after changing dependencies).
lock: setup
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements.lock

clean:
	rm -rf .rpcwatch .rpcwatch-trainticket
