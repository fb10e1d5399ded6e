# rpcwatch image: Airflow 3.3 (CeleryExecutor) + the rpcwatch `tasks` package + DAGs/plugins.
# One Dockerfile, two variants, picked with build args (docker-compose.yml sets both):
#   CPU (default): TORCH_INDEX=https://download.pytorch.org/whl/cpu  -> torch 2.13.0+cpu, no CUDA libraries
#   GPU worker:    TORCH_INDEX=https://pypi.org/simple (PyPI's Linux torch wheels are CUDA builds), or a
#                  PyTorch CUDA index such as https://download.pytorch.org/whl/cu128 to pick the CUDA version.
# The MLflow server runs from this image too (same mlflow version as the clients, psycopg2 included).
# A third, orthogonal choice: RPCWATCH_EXTRA=ducklake (compose passes it through) lays pyproject's
# `ducklake` extra over the lock, for the shared DuckLake warehouse (RPCWATCH_WAREHOUSE=ducklake):
# DuckDB 1.4.4 with its ducklake and postgres extensions instead of the lock's DuckDB 2.0.1.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
# The CeleryExecutor's packages. Both versions declare apache-airflow>=2.11 and were checked against
# apache-airflow 3.3.2 (Python 3.11); requirements.lock pins them (and celery, kombu, redis, asyncpg)
# too, for `make up EXECUTOR=celery` and tests/test_celery.py, so step 2 already installs the same.
ARG AIRFLOW_EXTRA_SPECS="apache-airflow-providers-celery==3.26.0 apache-airflow-providers-postgres==7.1.1 psycopg2-binary>=2.9.9 asyncpg>=0.30.0"
ARG AIRFLOW_UID=50000

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AIRFLOW_HOME=/opt/airflow \
    RPCWATCH_HOME=/opt/rpcwatch/home

# curl: healthchecks; tini: PID 1 that forwards SIGTERM so Celery workers shut down warm.
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && pip install --upgrade pip

# 1) torch first, from the index picked above (CPU build unless this is the GPU image).
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
 && echo "${TORCH_SPEC}" > /tmp/torch-constraint.txt

# 2) the locked dependencies. torch/triton/nvidia-* lines are dropped (torch is already in, in the
#    variant this image needs; a lock frozen on a CPU box pins `torch==2.13.0+cpu`, which is not on
#    PyPI), and so are editable / self-referencing lines for rpcwatch itself.
COPY requirements.lock /tmp/requirements.lock
RUN grep -viE '^(torch|triton)[[:space:]]*(==|@|$)|^nvidia-|^-e[[:space:]]|^rpcwatch[[:space:]]*(==|@)' \
        /tmp/requirements.lock > /tmp/requirements.image.txt \
 && pip install -c /tmp/torch-constraint.txt -r /tmp/requirements.image.txt

# 3) Celery executor + Postgres metadata DB drivers (sync psycopg2 and the asyncpg that Airflow 3
#    derives for its async engine), constrained to the lock so nothing locked moves.
RUN pip install -c /tmp/torch-constraint.txt -c /tmp/requirements.image.txt ${AIRFLOW_EXTRA_SPECS}

# 4) optional: one extra of pyproject.toml over the lock (RPCWATCH_EXTRA, empty = none). Its pins are
#    read from pyproject's [project.optional-dependencies], as the Makefile's DuckLake overlay does, so
#    they live in one place; --no-deps: the extra's pins are the whole set (`ducklake`: DuckDB 1.4.4
#    and its duckdb-ext-ducklake / duckdb-ext-postgres packages; DuckDB has no dependencies), nothing
#    else locked moves. An unknown extra fails the build, naming the ones there are.
ARG RPCWATCH_EXTRA=""
WORKDIR /opt/rpcwatch
COPY pyproject.toml ./
RUN if [ -n "${RPCWATCH_EXTRA}" ]; then \
      pins="$(python -c 'import sys, tomllib; extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; name = sys.argv[1]; print(*extras[name]) if name in extras else sys.exit(f"RPCWATCH_EXTRA={name}: not an extra of pyproject.toml (there are: {sorted(extras)})")' "${RPCWATCH_EXTRA}")" \
   && echo "RPCWATCH_EXTRA=${RPCWATCH_EXTRA}: pip install --no-deps ${pins}" \
   && pip install --no-deps ${pins}; \
    fi

# 5) the project itself, without touching the resolved dependencies.
COPY tasks/ ./tasks/
COPY dags/ ./dags/
COPY plugins/ ./plugins/
# The api-server's entrypoint: admin password from the environment into SimpleAuthManager's file.
COPY deploy/simple_auth_passwords.py ./deploy/
RUN pip install --no-deps -e . \
 && python -c "import torch, duckdb, mlflow, psycopg2, asyncpg, tasks, airflow.providers.celery; \
spec = '${TORCH_SPEC}'; \
assert '==' not in spec or torch.__version__.split('+')[0] == spec.split('==')[1], torch.__version__; \
print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && if [ "${RPCWATCH_EXTRA}" = ducklake ]; then \
      python -c "import duckdb; from tasks.lake import extension_directory; \
con = duckdb.connect(config={'extension_directory': str(extension_directory()), 'autoinstall_known_extensions': False}); \
con.execute('LOAD ducklake'); con.execute('LOAD postgres'); \
assert duckdb.__version__.startswith('1.4.'), duckdb.__version__; \
print('duckdb', duckdb.__version__, 'with its ducklake and postgres extensions, loaded offline')"; \
    fi

RUN useradd --uid "${AIRFLOW_UID}" --gid 0 --create-home --shell /bin/bash airflow \
 && mkdir -p /opt/airflow/logs /opt/rpcwatch/home /opt/rpcwatch/lake /opt/rpcwatch/incoming /mlartifacts \
 && chown -R "${AIRFLOW_UID}:0" /opt/airflow /opt/rpcwatch/home /opt/rpcwatch/lake /mlartifacts

USER ${AIRFLOW_UID}
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["airflow", "version"]
