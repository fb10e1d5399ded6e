#!/usr/bin/env bash
# Runs once, on the first start of an empty postgres-db volume (docker-entrypoint-initdb.d), as
# POSTGRES_USER (airflow, the superuser and Airflow's metadata DB role). Two more databases, each
# with its own login role and password (from .env):
#   mlflow  MLflow's backend store, role `mlflow` (MLFLOW_DB_PASSWORD). MLflow creates its tables
#           itself on first start.
#   lake    the DuckLake catalog of the shared warehouse (RPCWATCH_WAREHOUSE=ducklake, tasks/lake.py),
#           role `lake` (LAKE_DB_PASSWORD), which the Airflow containers log in as through libpq's
#           PG* variables. DuckLake creates its catalog tables itself on the first attach. Created
#           whatever the warehouse mode, so switching to the lake later needs nothing here.
# Neither role can read or change Airflow's metadata (or the other's database), and a leaked
# password of one is not the superuser's.
# An existing volume (made before this script, or before the lake) keeps its old setup;
# deploy/README.md says how to add the missing roles and databases.
set -Eeo pipefail

for var in MLFLOW_DB_PASSWORD LAKE_DB_PASSWORD; do
    if [ -z "${!var:-}" ]; then
        echo "postgres-init: ${var} is not set (see .env.example)" >&2
        exit 1
    fi
done

# psql substitutes :'mlflow_password' / :'lake_password' as quoted literals, so any character in
# them is safe.
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER}" --dbname "${POSTGRES_DB}" \
     --set=mlflow_password="${MLFLOW_DB_PASSWORD}" \
     --set=lake_password="${LAKE_DB_PASSWORD}" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
CREATE ROLE lake LOGIN PASSWORD :'lake_password';
CREATE DATABASE lake OWNER lake;
REVOKE ALL ON DATABASE lake FROM PUBLIC;
REVOKE ALL ON DATABASE airflow FROM PUBLIC;
SQL
