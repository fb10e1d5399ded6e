"""Wiring checks for the team deployment: docker-compose.yml, Dockerfile, deploy/postgres-init.sql.

The containers themselves cannot start here (no Docker engine on the dev/CI machines), so these
tests check the wiring instead: which services exist and what they run, that every dependency
points at a real service, that all Airflow containers share one executor, one JWT secret, one
RPCWATCH_HOME volume and the MLflow URI, that the init service creates the DuckDB writer pool (sized
for the warehouse mode), and that the image installs torch before the lock file; for the shared
DuckLake warehouse, that every Airflow container gets the same mode, lake volume and PG* catalog
settings, and that the image's `RPCWATCH_EXTRA` install takes its pins from pyproject.toml. The init
script's pool sizing and image check, and the Dockerfile's pin lookup, run for real (with a stub
`airflow`); `docker compose config` is run as well when a Compose client is installed (it validates
the file without an engine); otherwise that test skips.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PG_INIT = ROOT / "deploy" / "postgres-init.sh"
ENV_EXAMPLE = ROOT / ".env.example"
PASSWORD_WRITER = ROOT / "deploy" / "simple_auth_passwords.py"
PYPROJECT = ROOT / "pyproject.toml"
LAKE_OVERLAY = ROOT / ".venv" / "ducklake"  # `make setup`: the ducklake extra's pins beside the venv

POOL = "rpcwatch_duckdb"
MLFLOW_URI = "http://mlflow:5000"
HOME = "/opt/rpcwatch/home"

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: object) -> object:
    """Resolve Compose `${VAR:-default}` interpolation as on a host with no variables set; a required
    `${VAR:?message}` (Compose refuses to start without it) becomes the placeholder `<VAR>`."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            if m.group(2) in (":-", "-"):
                return m.group(3)
            if m.group(2) in (":?", "?"):
                return f"<{m.group(1)}>"
            return ""

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE_FILE.read_text())  # safe_load resolves the `<<: *anchor` merges
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return interpolate(data)


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def command(svc: dict) -> list[str]:
    cmd = svc.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def env(svc: dict) -> dict[str, str]:
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {k: "" if v is None else str(v) for k, v in raw.items()}


def depends_on(svc: dict) -> dict[str, str]:
    raw = svc.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def mounts(svc: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) for each volume, short or long syntax."""
    out = []
    for vol in svc.get("volumes") or []:
        if isinstance(vol, dict):
            out.append((vol.get("source", ""), vol["target"], "ro" if vol.get("read_only") else "rw"))
        else:
            parts = vol.split(":")
            out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return out


def airflow_services(services: dict[str, dict]) -> dict[str, dict]:
    """Every service running an Airflow component (the init one-shot included)."""
    found = {}
    for name, svc in services.items():
        if any(k.startswith("AIRFLOW__") for k in env(svc)):
            found[name] = svc
    return found


def by_airflow_command(services: dict[str, dict], *words: str) -> dict[str, dict]:
    n = len(words)
    return {name: svc for name, svc in services.items() if command(svc)[: n + 1] == ["airflow", *words]}


def option(cmd: list[str], flag: str) -> str | None:
    for i, tok in enumerate(cmd):
        if tok == flag and i + 1 < len(cmd):
            return cmd[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def workers(services: dict[str, dict]) -> dict[str, dict]:
    return by_airflow_command(services, "celery", "worker")


def one(found: dict[str, dict], what: str) -> tuple[str, dict]:
    assert len(found) == 1, f"expected exactly one {what}, found {sorted(found)}"
    return next(iter(found.items()))


def init_service(services: dict[str, dict]) -> tuple[str, dict]:
    found = {n: s for n, s in services.items() if "airflow db migrate" in " ".join(command(s))}
    return one(found, "init service running `airflow db migrate`")


def script_text_lines(svc: dict) -> list[str]:
    """The init service's shell script, one command per line, comments and blank lines dropped."""
    lines = []
    for chunk in command(svc):
        for line in chunk.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def script_lines(svc: dict) -> list[list[str]]:
    """The init service's shell script, one shlex-split command per line, comments dropped."""
    return [shlex.split(line) for line in script_text_lines(svc)]


# --- services and dependencies ----------------------------------------------------------------


def test_every_depends_on_target_exists(services):
    for name, svc in services.items():
        for target in depends_on(svc):
            assert target in services, f"{name} depends on unknown service {target!r}"
            assert target != name


def test_depends_on_conditions(services):
    conds = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in services.items():
        for target, cond in depends_on(svc).items():
            assert cond in conds, f"{name} -> {target}: {cond}"
            if cond == "service_healthy" and target in services:
                assert "healthcheck" in services[target], (
                    f"{name} waits for {target}'s health, which has no healthcheck"
                )
    init_name, _ = init_service(services)
    for name, svc in airflow_services(services).items():
        deps = depends_on(svc)
        assert deps.get("postgres") == "service_healthy", name
        assert deps.get("redis") == "service_healthy", name
        if name != init_name and svc.get("restart") not in (None, "no"):
            assert deps.get(init_name) == "service_completed_successfully", f"{name} must wait for {init_name}"


def test_airflow_components_exist(services):
    for component in ("api-server", "scheduler", "dag-processor", "triggerer"):
        one(by_airflow_command(services, component), f"`airflow {component}` service")


def test_default_and_gpu_workers(services):
    found = workers(services)
    queues = {name: option(command(svc), "--queues") for name, svc in found.items()}
    default = {n: found[n] for n, q in queues.items() if q and "default" in q.split(",")}
    gpu = {n: found[n] for n, q in queues.items() if q and "gpu" in q.split(",")}
    one(default, "Celery worker on the default queue")
    gpu_name, gpu_svc = one(gpu, "Celery worker on the gpu queue")
    assert queues[gpu_name] == "gpu", "the GPU worker must serve only the gpu queue"
    assert option(command(gpu_svc), "--concurrency") == "1"
    assert not set(default) & set(gpu), "the default-queue worker must not also take gpu tasks"

    devices = gpu_svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and int(d.get("count", 0)) == 1 and "gpu" in d.get("capabilities", [])
        for d in devices
    ), devices
    for name, svc in found.items():
        if name != gpu_name:
            assert "devices" not in str(svc.get("deploy", "")), f"{name} should not reserve a GPU"


def test_gpu_worker_image_is_the_cuda_variant(services):
    gpu_name, gpu_svc = one(
        {n: s for n, s in workers(services).items() if option(command(s), "--queues") == "gpu"}, "gpu worker"
    )
    cpu_name, cpu_svc = one(
        {n: s for n, s in workers(services).items() if option(command(s), "--queues") == "default"}, "default worker"
    )
    assert gpu_svc["image"] != cpu_svc["image"], "GPU and CPU images must not share a tag"
    gpu_args, cpu_args = gpu_svc["build"]["args"], cpu_svc["build"]["args"]
    assert gpu_args["TORCH_SPEC"] == cpu_args["TORCH_SPEC"] == "torch==2.13.0"
    assert "/whl/cpu" in cpu_args["TORCH_INDEX"]
    assert "/whl/cpu" not in gpu_args["TORCH_INDEX"]


def test_apiserver_serves_the_execution_api(services):
    api_name, api = one(by_airflow_command(services, "api-server"), "api-server")
    assert any(str(p).split(":")[-1] == "8080" for p in api.get("ports", [])), api.get("ports")
    urls = {env(svc).get("AIRFLOW__CORE__EXECUTION_API_SERVER_URL") for svc in airflow_services(services).values()}
    assert urls == {f"http://{api_name}:8080/execution/"}, urls


# --- shared Airflow configuration -------------------------------------------------------------


def test_celery_executor_everywhere(services):
    airflow = airflow_services(services)
    assert len(airflow) >= 7
    for name, svc in airflow.items():
        e = env(svc)
        assert e.get("AIRFLOW__CORE__EXECUTOR") == "CeleryExecutor", name
        assert e.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "").startswith("postgresql+psycopg2://"), name
        assert "@postgres:" in e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], name
        assert e.get("AIRFLOW__CELERY__BROKER_URL", "").startswith("redis://redis:"), name
        assert e.get("AIRFLOW__CORE__LOAD_EXAMPLES") == "False", name


def test_same_secrets_and_folders_everywhere(services):
    airflow = airflow_services(services)
    for key in (
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CORE__DAGS_FOLDER",
        "AIRFLOW__CORE__PLUGINS_FOLDER",
        "AIRFLOW__CORE__AUTH_MANAGER",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
        "AIRFLOW__CORE__FERNET_KEY",
    ):
        values = {env(svc).get(key) for svc in airflow.values()}
        assert len(values) == 1 and None not in values and "" not in values, (key, values)
    e = env(next(iter(airflow.values())))
    assert e["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/rpcwatch/dags"
    assert e["AIRFLOW__CORE__PLUGINS_FOLDER"] == "/opt/rpcwatch/plugins"


def test_every_airflow_service_sees_the_same_home_volume_and_mlflow(compose, services):
    airflow = airflow_services(services)
    sources = set()
    for name, svc in airflow.items():
        e = env(svc)
        assert e.get("RPCWATCH_HOME") == HOME, name
        assert e.get("RPCWATCH_MLFLOW_TRACKING_URI") == MLFLOW_URI, name
        assert e.get("RPCWATCH_SOURCE") == "/opt/rpcwatch/incoming", name
        home = [src for src, target, _ in mounts(svc) if target == e["RPCWATCH_HOME"]]
        assert len(home) == 1, f"{name} does not mount a volume at RPCWATCH_HOME"
        sources.add(home[0])
        incoming = [(src, mode) for src, target, mode in mounts(svc) if target == e["RPCWATCH_SOURCE"]]
        assert incoming == [("./incoming", "ro")], (name, incoming)
    assert len(sources) == 1, f"Airflow services mount different homes: {sources}"
    (volume,) = sources
    assert volume in (compose.get("volumes") or {}), f"{volume} must be a named volume, shared by all"
    assert f":{HOME}" not in " ".join(str(v) for v in services["mlflow"].get("volumes", []))


def test_env_pool_matches_settings(services):
    for name, svc in airflow_services(services).items():
        assert env(svc).get("RPCWATCH_AIRFLOW_POOL") == POOL, name
    settings = pytest.importorskip("tasks.settings")
    if hasattr(settings, "Settings"):
        assert settings.Settings().airflow_pool == POOL


# --- the shared warehouse on DuckLake ---------------------------------------------------------

LAKE_ENV = ("RPCWATCH_WAREHOUSE", "RPCWATCH_LAKE_DATA", "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE")


def test_every_airflow_service_sees_the_same_warehouse_and_lake(compose, services):
    """Mode, lake data folder and catalog database: the same in every Airflow container (the DAG file
    reads the settings when parsed, tasks when they run), the data on one named volume mounted at
    RPCWATCH_LAKE_DATA everywhere, the catalog in the compose Postgres as its own role `lake`."""
    settings = pytest.importorskip("tasks.settings")
    airflow = airflow_services(services)
    for key in LAKE_ENV:
        values = {env(svc).get(key) for svc in airflow.values()}
        assert len(values) == 1 and None not in values and "" not in values, (key, values)
    e = env(next(iter(airflow.values())))
    assert e["RPCWATCH_WAREHOUSE"] == "file", "the embedded file stays the default"
    assert ("RPCWATCH_WAREHOUSE", ":-", "file") in references(COMPOSE_FILE.read_text())
    assert settings.env_name("warehouse_mode") == "RPCWATCH_WAREHOUSE"
    assert settings.env_name("lake_data") == "RPCWATCH_LAKE_DATA"
    lake_data = e["RPCWATCH_LAKE_DATA"]
    assert settings.LAKE_DATA_PATTERN.fullmatch(lake_data), f"RPCWATCH_LAKE_DATA={lake_data}: settings refuse it"
    # both modes load with the compose environment (the lake needs its data folder set)
    for mode in settings.WAREHOUSES:
        loaded = settings.load_settings({**e, "RPCWATCH_WAREHOUSE": mode})
        assert loaded.warehouse_mode == mode
    assert str(settings.load_settings({**e, "RPCWATCH_WAREHOUSE": "ducklake"}).warehouse.data) == lake_data

    sources = set()
    for name, svc in airflow.items():
        found = [(src, mode) for src, target, mode in mounts(svc) if target.rstrip("/") == lake_data]
        assert len(found) == 1, f"{name} does not mount a volume at RPCWATCH_LAKE_DATA={lake_data}"
        src, mode = found[0]
        assert mode == "rw", f"{name} mounts the lake read-only"
        sources.add(src)
        home = [s for s, target, _ in mounts(svc) if target == HOME]
        assert src not in home, f"{name}: the lake's data must not share the home volume"
    assert len(sources) == 1, f"Airflow services mount different lake volumes: {sources}"
    (volume,) = sources
    assert volume in (compose.get("volumes") or {}), f"{volume} must be a named volume, shared by all"

    # the catalog: libpq's variables at the compose Postgres, a database and role of the lake's own
    assert e["PGHOST"] in services and str(services[e["PGHOST"]]["image"]).startswith("postgres:"), e["PGHOST"]
    assert e["PGPORT"] == "5432"
    assert e["PGPASSWORD"] == "<LAKE_DB_PASSWORD>"
    airflow_user, _ = _db_user_and_password(e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    mlflow_user, _ = _db_user_and_password(option(command(services["mlflow"]), "--backend-store-uri") or "")
    assert e["PGUSER"] not in (airflow_user, mlflow_user), "the lake logs in as a role of its own"
    assert e["PGDATABASE"] not in ("airflow", "mlflow", "postgres"), "the lake's catalog has a database of its own"
    assert env(services[e["PGHOST"]]).get("LAKE_DB_PASSWORD") == "<LAKE_DB_PASSWORD>"
    script = PG_INIT.read_text()
    assert re.search(rf"(?i)CREATE\s+(ROLE|USER)\s+{e['PGUSER']}\s+LOGIN\b[^;]*\bPASSWORD\s+:'", script), script
    assert re.search(rf"(?i)CREATE\s+DATABASE\s+{e['PGDATABASE']}\s+OWNER\s+{e['PGUSER']}\b", script), script
    assert re.search(rf"(?i)REVOKE\s+ALL\s+ON\s+DATABASE\s+{e['PGDATABASE']}\s+FROM\s+PUBLIC", script), script
    assert "LAKE_DB_PASSWORD" in script


def test_every_image_is_built_with_the_same_extra(services):
    """RPCWATCH_EXTRA reaches every build from the Dockerfile (CPU and GPU alike), empty by default:
    a worker on DuckDB 1.4 and another on 2.0 would not share a warehouse."""
    built = {name: svc["build"] for name, svc in services.items() if svc.get("build")}
    assert len(built) >= 2, sorted(built)
    values = {name: (b.get("args") or {}).get("RPCWATCH_EXTRA") for name, b in built.items()}
    assert set(values.values()) == {""}, values
    refs = [r for r in references(COMPOSE_FILE.read_text()) if r[0] == "RPCWATCH_EXTRA"]
    assert refs and all(op == ":-" and word == "" for _, op, word in refs), refs
    assert arg_defaults(dockerfile_instructions()).get("RPCWATCH_EXTRA") == ""


# --- init service -----------------------------------------------------------------------------


def _init_script_parts(svc: dict) -> tuple[list[str], list[str]]:
    """The init script's lines before `airflow db migrate` (the image check), and those from it
    through the line that sets the writer pool."""
    lines = script_lines(svc)
    migrate = next(i for i, cmd in enumerate(lines) if cmd[:3] == ["airflow", "db", "migrate"])
    pools = [i for i, cmd in enumerate(lines) if cmd[:3] == ["airflow", "pools", "set"] and cmd[3:4] == [POOL]]
    assert len(pools) == 1, f"the init service must set {POOL} once, found {len(pools)}"
    assert pools[0] > migrate, "pools can only be set after `airflow db migrate`"
    text = script_text_lines(svc)
    return text[:migrate], text[migrate : pools[0] + 1]


def _run_init_lines(svc: dict, lines: list[str], tmp_path: Path, **extra_env: str) -> subprocess.CompletedProcess:
    """Run init script lines as the init service's shell does, in its environment (plus `extra_env`),
    with this venv's Python as `python` and a stub `airflow` that prints the pools it is asked to set."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    entry = [str(part) for part in svc.get("entrypoint") or []]
    shell = entry[entry.index("--") + 1 :] if "--" in entry else entry
    assert shell[:1] and Path(shell[0]).name == "bash" and shell[-1] == "-c", entry
    assert any(re.fullmatch(r"-[a-z]*e[a-z]*", s) for s in shell), f"the init must stop on errors: {entry}"
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (stubs / "airflow").write_text('#!/bin/sh\nif [ "$1 $2" = "pools set" ]; then echo "POOL $3 $4"; fi\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    run_env = {**env(svc), "PATH": f"{stubs}{os.pathsep}{os.environ.get('PATH', '')}", **extra_env}
    return subprocess.run(
        [bash, *shell[1:], "\n".join(lines)], env=run_env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_init_migrates_then_creates_the_duckdb_pool(services, tmp_path):
    """The pool gets 1 slot on the embedded file (one DuckDB writer at a time) and the lake's
    `Settings.writer_slots` on DuckLake: the init script's own lines run here, per mode."""
    name, svc = init_service(services)
    assert svc.get("restart") in (None, "no"), "the init service is a one-shot"
    _, pool_lines = _init_script_parts(svc)
    settings = pytest.importorskip("tasks.settings")
    expected = {"file": "1", "ducklake": str(settings.LAKE_WRITER_SLOTS)}
    assert int(expected["ducklake"]) > 1, "a lake takes many writers"
    for mode, slots in expected.items():
        done = _run_init_lines(svc, pool_lines, tmp_path, RPCWATCH_WAREHOUSE=mode)
        assert done.returncode == 0, (mode, done.stderr)
        assert f"POOL {POOL} {slots}\n" in done.stdout, f"{mode}: {POOL} must get {slots} slot(s): {done.stdout!r}"
    # a mode the settings refuse stops the init before any pool is set
    done = _run_init_lines(svc, pool_lines, tmp_path, RPCWATCH_WAREHOUSE="lake")
    assert done.returncode != 0 and "POOL" not in done.stdout, done.stdout
    assert "RPCWATCH_WAREHOUSE" in done.stderr, done.stderr


def test_init_refuses_an_image_that_does_not_fit_the_warehouse(services, tmp_path):
    """Before anything else, the init checks the image against RPCWATCH_WAREHOUSE: the lake needs the
    ducklake extra (DuckDB 1.4.4 + extensions), the embedded file the lock's DuckDB 2.0. This venv
    is the lock's; `make setup`'s overlay stands in for an image built with RPCWATCH_EXTRA=ducklake."""
    _, svc = init_service(services)
    check, _ = _init_script_parts(svc)
    assert check, "the init does not check the image before `airflow db migrate`"
    done = _run_init_lines(svc, check, tmp_path, RPCWATCH_WAREHOUSE="file")
    assert done.returncode == 0, done.stderr
    done = _run_init_lines(svc, check, tmp_path, RPCWATCH_WAREHOUSE="ducklake")
    assert done.returncode != 0 and "RPCWATCH_EXTRA=ducklake" in done.stderr, done.stderr
    if not (LAKE_OVERLAY / "duckdb_ext").is_dir():
        pytest.skip(f"no DuckLake overlay at {LAKE_OVERLAY} (make setup builds it)")
    lake = {"PYTHONPATH": str(LAKE_OVERLAY)}
    done = _run_init_lines(svc, check, tmp_path, RPCWATCH_WAREHOUSE="ducklake", **lake)
    assert done.returncode == 0, done.stderr
    done = _run_init_lines(svc, check, tmp_path, RPCWATCH_WAREHOUSE="file", **lake)
    assert done.returncode != 0 and "RPCWATCH_EXTRA=ducklake" in done.stderr, done.stderr


def test_queues_and_pools_named_in_dags_are_served(services):
    """Literal queue=/pool= names in dags/ must be a worker queue / a pool the init creates."""
    served = set()
    for svc in workers(services).values():
        served.update((option(command(svc), "--queues") or "").split(","))
    served.add(env(next(iter(workers(services).values()))).get("AIRFLOW__OPERATORS__DEFAULT_QUEUE", "default"))
    _, init = init_service(services)
    pools = {cmd[3] for cmd in script_lines(init) if cmd[:3] == ["airflow", "pools", "set"]}
    pools.add("default_pool")
    for path in sorted((ROOT / "dags").rglob("*.py")):
        text = path.read_text(errors="replace")
        for queue in re.findall(r"""\bqueue\s*=\s*["']([^"']+)["']""", text):
            assert queue in served, f"{path.name}: queue {queue!r} has no worker (served: {served})"
        for pool in re.findall(r"""\bpool\s*=\s*["']([^"']+)["']""", text):
            assert pool in pools, f"{path.name}: pool {pool!r} is not created by the init service"


# --- MLflow and Postgres ----------------------------------------------------------------------


def test_mlflow_server(services):
    svc = services["mlflow"]
    cmd = command(svc)
    assert cmd[:2] == ["mlflow", "server"]
    assert option(cmd, "--host") == "0.0.0.0"
    port = option(cmd, "--port")
    assert MLFLOW_URI.endswith(f":{port}")
    hosts = (option(cmd, "--allowed-hosts") or "").split(",")
    for host in ("mlflow", f"mlflow:{port}", f"localhost:{port}"):
        assert host in hosts, f"{host} missing from --allowed-hosts {hosts}"
    backend = option(cmd, "--backend-store-uri") or ""
    assert backend.startswith("postgresql") and backend.endswith("@postgres:5432/mlflow"), backend
    dest = option(cmd, "--artifacts-destination")
    assert dest and any(target == dest for _, target, _ in mounts(svc)), "artifacts must be on a volume"
    assert depends_on(svc).get("postgres") == "service_healthy"


def test_mlflow_database_is_created_by_postgres_init(services):
    svc = services["postgres"]
    assert str(svc["image"]).startswith("postgres:16")
    init_mounts = [(src, t) for src, t, _ in mounts(svc) if t.startswith("/docker-entrypoint-initdb.d/")]
    assert init_mounts, "postgres has no init script mounted"
    for src, _ in init_mounts:
        assert (ROOT / src).resolve() == PG_INIT.resolve()
    assert re.search(r"(?im)^\s*CREATE\s+DATABASE\s+mlflow\b", PG_INIT.read_text())


def test_healthchecks(services):
    def test_of(name: str) -> str:
        hc = services[name].get("healthcheck")
        assert hc and hc.get("test"), f"{name} has no healthcheck"
        t = hc["test"]
        return " ".join(t) if isinstance(t, list) else t

    assert "pg_isready" in test_of("postgres")
    assert "redis-cli ping" in test_of("redis")
    assert str(services["redis"]["image"]).startswith("redis:7")
    api_name, _ = one(by_airflow_command(services, "api-server"), "api-server")
    assert "/api/v2/monitor/health" in test_of(api_name)
    assert re.search(r"localhost:5000/health\b", test_of("mlflow"))


# --- secrets and login ------------------------------------------------------------------------

# Every variable that holds a secret; each must be set in `.env` (no default anywhere).
SECRETS = {
    "POSTGRES_PASSWORD",  # Postgres superuser = Airflow's metadata DB role
    "MLFLOW_DB_PASSWORD",  # MLflow's own DB role
    "LAKE_DB_PASSWORD",  # the DuckLake catalog's DB role (PGPASSWORD of the Airflow containers)
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW_FERNET_KEY",
    "AIRFLOW_ADMIN_PASSWORD",
    "FLOWER_BASIC_AUTH",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|_KEY$|TOKEN|BASIC_AUTH|CREDENTIAL")
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def references(text: str) -> list[tuple[str, str | None, str]]:
    """(VAR, operator, word) for each `${...}` in the raw file, `$$` escapes skipped."""
    return [(m.group(1), m.group(2), m.group(3) or "") for m in _REF.finditer(text.replace("$$", ""))]


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def test_secrets_have_no_default_and_fail_fast():
    refs = references(COMPOSE_FILE.read_text())
    used = {var for var, _, _ in refs}
    assert used >= SECRETS, f"secrets not taken from .env: {sorted(SECRETS - used)}"
    for var, op, word in refs:
        if var in SECRETS or SECRET_NAME.search(var):
            assert op == ":?", f"${{{var}}} must be written ${{{var}:?...}} (no default, fails when unset or empty)"
            assert ".env" in word, f"${{{var}:?...}}: the message should say where to set it, got {word!r}"


def test_no_known_insecure_values(compose):
    text = COMPOSE_FILE.read_text()
    for bad in ("change-me", "rpcwatch-dev-", "airflow:airflow@", ":-airflow}"):
        assert bad not in text, f"{bad!r} is a working default secret"
    for name, svc in airflow_services(compose["services"]).items():
        e = env(svc)
        assert e["AIRFLOW__API_AUTH__JWT_SECRET"] == "<AIRFLOW_JWT_SECRET>", name
        assert e["AIRFLOW__API__SECRET_KEY"] == "<AIRFLOW_API_SECRET_KEY>", name
        assert e["AIRFLOW__CORE__FERNET_KEY"] == "<AIRFLOW_FERNET_KEY>", name


def _db_user_and_password(url: str) -> tuple[str, str]:
    m = re.match(r"^[a-z0-9+]+://([^:@/]+):([^@]+)@", url)
    assert m, f"no user:password in {url}"
    return m.group(1), m.group(2)


def test_mlflow_has_its_own_database_role_and_password(services):
    backend = option(command(services["mlflow"]), "--backend-store-uri") or ""
    mlflow_user, mlflow_password = _db_user_and_password(backend)
    for name, svc in airflow_services(services).items():
        airflow_user, airflow_password = _db_user_and_password(env(svc)["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        assert mlflow_password != airflow_password, f"MLflow reuses {name}'s DB password {airflow_password}"
        assert mlflow_user != airflow_user, f"MLflow logs in as {name}'s DB role {airflow_user}"
    assert mlflow_password == "<MLFLOW_DB_PASSWORD>"
    # Postgres creates that role on first start, with the password from the environment.
    pg = env(services["postgres"])
    assert pg.get("MLFLOW_DB_PASSWORD") == "<MLFLOW_DB_PASSWORD>"
    assert pg.get("POSTGRES_PASSWORD") == "<POSTGRES_PASSWORD>"
    script = PG_INIT.read_text()
    assert re.search(rf"(?i)CREATE\s+(ROLE|USER)\s+{mlflow_user}\b[^;]*\bPASSWORD\s+:'", script), script
    assert re.search(rf"(?i)CREATE\s+DATABASE\s+mlflow\s+OWNER\s+{mlflow_user}\b", script)
    assert "MLFLOW_DB_PASSWORD" in script
    bash = shutil.which("bash")
    if bash:
        done = subprocess.run([bash, "-n", str(PG_INIT)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr


def test_secrets_reach_only_the_services_that_need_them(services):
    for name, svc in services.items():
        e = env(svc)
        if "<MLFLOW_DB_PASSWORD>" in str(e):
            assert name == "postgres", f"{name} gets MLflow's DB password"
        if "<LAKE_DB_PASSWORD>" in str(e):
            assert name == "postgres" or name in airflow_services(services), f"{name} gets the lake's DB password"
        if "<AIRFLOW_ADMIN_PASSWORD>" in str(e):
            assert command(svc)[:2] == ["airflow", "api-server"], f"{name} gets the admin password"


def test_a_real_login_not_everyone_admin(services):
    airflow = airflow_services(services)
    for name, svc in airflow.items():
        e = env(svc)
        assert e.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "").lower() == "false", name
        users = dict(u.split(":")[:2] for u in e["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(",") if u)
        assert users.get("admin") == "admin", users
    api_name, api = one(by_airflow_command(services, "api-server"), "api-server")
    e = env(api)
    assert e.get("AIRFLOW_ADMIN_PASSWORD") == "<AIRFLOW_ADMIN_PASSWORD>"
    passwords_file = e.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
    assert passwords_file and passwords_file.startswith("/"), passwords_file
    entry = api.get("entrypoint") or []
    assert any(str(part).endswith("simple_auth_passwords.py") for part in entry), entry
    assert entry[0] == "/usr/bin/tini", "keep tini as PID 1"


def test_flower_is_behind_basic_auth(services):
    found = by_airflow_command(services, "celery", "flower")
    for name, svc in found.items():
        assert env(svc).get("AIRFLOW__CELERY__FLOWER_BASIC_AUTH") == "<FLOWER_BASIC_AUTH>", name
        check = " ".join(svc["healthcheck"]["test"])
        assert "-u " in check and "FLOWER_BASIC_AUTH" in check, f"{name}'s healthcheck would get 401: {check}"


def test_the_admin_password_writer(tmp_path):
    """deploy/simple_auth_passwords.py: admin's password from the environment into the passwords
    file (0600), other users kept, the variable not passed on, then runs the command."""
    import json
    import os
    import sys

    target = tmp_path / "auth" / "passwords.json"
    target.parent.mkdir()
    target.write_text(json.dumps({"admin": "old", "viewer": "kept"}))
    child = "import os, sys; sys.stdout.write(os.environ.get('AIRFLOW_ADMIN_PASSWORD', '<unset>'))"
    run_env = {
        "PATH": os.environ.get("PATH", ""),
        "AIRFLOW_ADMIN_PASSWORD": "s3cr\"et'$x",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(target),
    }
    done = subprocess.run(
        [sys.executable, str(PASSWORD_WRITER), sys.executable, "-c", child],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "<unset>"
    assert json.loads(target.read_text()) == {"admin": "s3cr\"et'$x", "viewer": "kept"}
    assert (target.stat().st_mode & 0o777) == 0o600
    for missing in ("AIRFLOW_ADMIN_PASSWORD", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"):
        bad = {k: v for k, v in run_env.items() if k != missing}
        done = subprocess.run(
            [sys.executable, str(PASSWORD_WRITER), "true"], env=bad, capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0 and missing in done.stderr, (missing, done.stderr)
    run_env["AIRFLOW_ADMIN_PASSWORD"] = ""
    done = subprocess.run(
        [sys.executable, str(PASSWORD_WRITER), "true"], env=run_env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0


def test_the_image_carries_the_password_writer(services):
    """The api-server's entrypoint script is copied into the image where compose runs it from."""
    workdir, targets = "/", set()
    for kw, rest in dockerfile_instructions():
        if kw == "WORKDIR":
            workdir = rest
        elif kw == "COPY" and PASSWORD_WRITER.name in rest:
            *srcs, dest = rest.split()
            assert f"deploy/{PASSWORD_WRITER.name}" in srcs, rest
            dest = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest.removeprefix('./')}"
            targets.add(f"{dest.rstrip('/')}/{PASSWORD_WRITER.name}" if dest.endswith("/") else dest)
    _, api = one(by_airflow_command(services, "api-server"), "api-server")
    script = next(str(part) for part in api["entrypoint"] if str(part).endswith(PASSWORD_WRITER.name))
    assert script in targets, (script, targets)


def test_env_example_documents_every_variable_and_holds_no_secret():
    refs = references(COMPOSE_FILE.read_text())
    documented = env_example()
    text = ENV_EXAMPLE.read_text()
    for var in sorted({v for v, _, _ in refs}):
        assert var in documented, f"{var} is used by docker-compose.yml but not in .env.example"
    for var in SECRETS:
        assert documented[var] == "", f".env.example must not ship a value for {var}"
        # each secret says how to make one
        block = text[: text.index(f"\n{var}=")].rsplit("\n\n", 1)[-1]
        assert re.search(r"openssl|python|secrets|Fernet", block), f"{var}: no generation command above it"
    assert "Fernet.generate_key()" in text


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)


def test_env_and_data_folders_are_not_committed():
    if not shutil.which("git") or _git("rev-parse", "--git-dir").returncode:
        pytest.skip("not a git checkout")
    for path in (
        ".env",
        ".env.local",
        ".rpcwatch/x",
        ".rpcwatch-trainticket/x",
        ".rpcwatch-demo/x",
        "incoming/x.parquet",
        "mlruns/x",
        "mlartifacts/x",
    ):
        assert _git("check-ignore", "-q", "--no-index", path).returncode == 0, f"{path} is not git-ignored"
    assert _git("check-ignore", "-q", "--no-index", ".env.example").returncode == 1, ".env.example must be committed"
    tracked = _git("ls-files", "--", ".env", "incoming").stdout.split()
    assert not tracked, f"tracked although ignored: {tracked}"


def test_env_is_kept_out_of_the_image_build_context():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert ".env" in patterns or ".env*" in patterns


# --- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, rest = buf.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


def arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for kw, rest in instructions:
        if kw == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            defaults[key.strip()] = value.strip().strip('"')
    return defaults


def expand(text: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: defaults.get(m.group(1), m.group(0)), text)


def test_dockerfile_installs_torch_before_the_lock():
    instructions = dockerfile_instructions()
    defaults = arg_defaults(instructions)
    runs = [expand(rest, defaults) for kw, rest in instructions if kw == "RUN"]
    torch_run = next(i for i, r in enumerate(runs) if re.search(r"pip install\b.*\btorch==2\.13\.0\b", r))
    lock_run = next(i for i, r in enumerate(runs) if "requirements.lock" in r)
    assert torch_run < lock_run, "torch must be installed before requirements.lock"
    assert re.search(r"pip install\b.*-r\s", runs[lock_run]), runs[lock_run]
    assert "download.pytorch.org/whl/cpu" in runs[torch_run], "default image must get the CPU torch build"
    project = next(i for i, r in enumerate(runs) if re.search(r"pip install\b.*--no-deps\b.*(-e\s+)?\.(\s|$)", r))
    assert project > lock_run, "the project goes in last, with --no-deps"
    extras = " ".join(runs)
    for pkg in ("apache-airflow-providers-celery", "psycopg2-binary"):
        assert pkg in extras, f"{pkg} is not installed in the image"


def _ducklake_pins() -> list[str]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["ducklake"]


def test_dockerfile_installs_the_extra_from_pyproject():
    """RPCWATCH_EXTRA=ducklake lays pyproject's `ducklake` pins over the lock (DuckDB 1.4.4 and its
    extension packages), read from pyproject.toml at build time: no pin is repeated in the Dockerfile.
    The lookup itself runs here on the real pyproject.toml."""
    pins = _ducklake_pins()
    assert any(re.fullmatch(r"duckdb==1\.4\.\d+", pin) for pin in pins), pins
    instructions = dockerfile_instructions()
    text = DOCKERFILE.read_text()
    for pin in pins:
        assert pin not in text, f"{pin} is repeated in the Dockerfile: the pins live in pyproject.toml"
    runs = [rest for kw, rest in instructions if kw == "RUN"]
    extra = [i for i, r in enumerate(runs) if "RPCWATCH_EXTRA" in r and "optional-dependencies" in r]
    assert len(extra) == 1, "one RUN installs the extra, reading pyproject's optional-dependencies"
    run = runs[extra[0]]
    lock_run = next(i for i, r in enumerate(runs) if "requirements.lock" in r)
    project = next(i for i, r in enumerate(runs) if re.search(r"pip install\b.*--no-deps\b.*-e\s+\.(\s|$)", r))
    assert lock_run < extra[0] < project, "the extra goes over the lock, before the project"
    assert re.search(r"pip install --no-deps \$\{?pins\}?", run), run
    copied_before = [rest for kw, rest in instructions[: instructions.index(("RUN", run))] if kw == "COPY"]
    assert any("pyproject.toml" in rest.split()[:-1] for rest in copied_before), "pyproject.toml is not there yet"

    match = re.search(r"python -c '([^']*)' \"\$\{RPCWATCH_EXTRA\}\"", run)
    assert match, run
    lookup = [sys.executable, "-c", match.group(1)]
    done = subprocess.run([*lookup, "ducklake"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == pins, done.stdout
    done = subprocess.run([*lookup, "no-such-extra"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "RPCWATCH_EXTRA=no-such-extra" in done.stderr, done.stderr


def test_the_ducklake_image_proves_its_extensions_load():
    """The build's last check on a ducklake image loads both extensions offline. It runs here on
    `make setup`'s overlay of the same pins, and fails on the lock's DuckDB 2.0 alone."""
    runs = [rest for kw, rest in dockerfile_instructions() if kw == "RUN"]
    checks = [m.group(1) for r in runs for m in re.finditer(r'python -c "([^"]*LOAD ducklake[^"]*)"', r)]
    assert len(checks) == 1, "the ducklake image is not checked at build time"
    (code,) = checks
    assert "LOAD postgres" in code and "autoinstall_known_extensions': False" in code, code
    plain = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0, "the check passes without the ducklake extra"
    if not (LAKE_OVERLAY / "duckdb_ext").is_dir():
        pytest.skip(f"no DuckLake overlay at {LAKE_OVERLAY} (make setup builds it)")
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{LAKE_OVERLAY}{os.pathsep}{ROOT}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "duckdb 1.4." in done.stdout, done.stdout


def test_dockerfile_copies_code_where_compose_points(services):
    instructions = dockerfile_instructions()
    base = expand(next(rest for kw, rest in instructions if kw == "FROM"), arg_defaults(instructions))
    assert base.startswith("python:3.11"), f"the image must be Python 3.11, not {base}"
    workdir, copied = "/", {}
    for kw, rest in instructions:
        if kw == "WORKDIR":
            workdir = rest
        elif kw == "COPY" and not rest.startswith("--from"):
            *srcs, dest = rest.split()
            for src in srcs:
                target = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest.lstrip('./')}"
                copied[src.rstrip("/")] = target.rstrip("/")
    for folder in ("dags", "plugins", "tasks"):
        assert folder in copied, f"{folder}/ is not copied into the image"
    assert "requirements.lock" in copied and "pyproject.toml" in copied
    e = env(next(iter(airflow_services(services).values())))
    assert copied["dags"] == e["AIRFLOW__CORE__DAGS_FOLDER"]
    assert copied["plugins"] == e["AIRFLOW__CORE__PLUGINS_FOLDER"]


# --- optional: a real Compose client ----------------------------------------------------------


def _compose_client() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_client_validates_the_file():
    client = _compose_client()
    if client is None:
        pytest.skip("no Compose client installed (docker compose / docker-compose)")
    done = subprocess.run(
        [*client, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr or done.stdout
