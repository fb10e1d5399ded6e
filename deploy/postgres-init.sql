-- Runs once, on the first start of an empty postgres-db volume (docker-entrypoint-initdb.d),
-- as POSTGRES_USER (airflow) against the `airflow` database. MLflow's backend store lives in its
-- own database on the same server; MLflow creates its tables itself on first start.
CREATE DATABASE mlflow;
