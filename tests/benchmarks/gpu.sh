#!/usr/bin/env bash
# The GPU figures the README still lacks, as one prepared run of <= 10 min on one lent GPU (the
# `device` tool's `run`, issue 25): batched against one-by-one training of 1,000 patterns, then an
# hour's retrain of stale patterns at 48 h of history, both on CUDA. The retrain's untimed set-up
# (champions from scratch, registered) is most of its time: 100 patterns fit the 10 minutes, and
# the benchmark projects its rate to 500 (its time verdict is for 500 on 2 CPU workers only).
#
#   bash tests/benchmarks/gpu.sh [cuda|cpu] [train-patterns 1000] [retrain-patterns 100]
#
# The lent machine's python3 holds torch and torch-geometric but not MLflow or DuckDB, and fetches
# nothing: bench_retrain needs their wheels carried (`.whl`, see the device tool's README), else it
# is skipped with the reason. `bash tests/benchmarks/gpu.sh cpu 4 4` checks the script here.
set -uo pipefail
cd "$(dirname "$0")/../.."
device=${1:-cuda} train=${2:-1000} retrain=${3:-100}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# one by one on a sample of 50 (its rate per model-step is what is compared), stacked on all
timeout 280 "$python" tests/benchmarks/bench_train.py --patterns "$train" --alone 50 --mode both --device "$device"
if "$python" -c "import mlflow, duckdb" 2>/dev/null; then
  timeout 290 "$python" tests/benchmarks/bench_retrain.py --patterns "$retrain" --hours 48 --workers 1 \
    --compare 10 --device "$device"
else
  echo "bench_retrain skipped: MLflow and DuckDB are not importable by $python (carry their wheels)"
fi
