#!/usr/bin/env bash
# Runs once, on the first start of an empty postgres-db volume (docker-entrypoint-initdb.d), as
# POSTGRES_USER (airflow, the superuser and Airflow's metadata DB role). MLflow's backend store gets
# its own database and its own login role `mlflow`, with MLFLOW_DB_PASSWORD (from .env): MLflow can
# neither read nor change Airflow's metadata, and a leaked MLflow password is not the superuser's.
# MLflow creates its tables itself on first start.
# An existing volume (made before this script) keeps its old setup; deploy/README.md says how to
# move it to the separate role.
set -Eeo pipefail

if [ -z "${MLFLOW_DB_PASSWORD:-}" ]; then
    echo "postgres-init: MLFLOW_DB_PASSWORD is not set (see .env.example)" >&2
    exit 1
fi

# psql substitutes :'mlflow_password' as a quoted literal, so any character in it is safe.
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER}" --dbname "${POSTGRES_DB}" \
     --set=mlflow_password="${MLFLOW_DB_PASSWORD}" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE airflow FROM PUBLIC;
SQL
