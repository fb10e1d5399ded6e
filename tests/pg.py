"""A throwaway PostgreSQL 15 server for tests and benchmarks: Debian's server binaries, a cluster in a
temp folder of its own, a free loopback port, trust auth. Used by tests/test_ducklake.py (the DuckLake
catalog) and tests/benchmarks/bench_registry.py (an MLflow server's backend store)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USER = "rpcwatch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_postgres_user(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse root: run them as `nobody` (runuser) when this process is root."""
    return ["runuser", "-u", "nobody", "--", *cmd] if os.geteuid() == 0 else cmd


def missing() -> str | None:
    """Why no server can be started here, or None."""
    for tool in ("initdb", "pg_ctl", "postgres", "createdb"):
        if not (PG_BIN / tool).is_file():
            return f"PostgreSQL 15 server binaries not installed ({PG_BIN / tool} missing)"
    return None


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str
    folder: Path

    def create_database(self, name: str) -> None:
        done = subprocess.run(
            [str(PG_BIN / "createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, name],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise RuntimeError(f"createdb {name} failed: {done.stderr[-2000:]}")

    def libpq_env(self, database: str) -> dict[str, str]:
        """libpq's own variables for `database` (what DuckLake's `ducklake:postgres:` catalog reads)."""
        return {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user, "PGDATABASE": database}


@contextlib.contextmanager
def postgres(keep: bool = False, prefix: str = "rpcwatch-pg-") -> Iterator[Server]:
    """A PostgreSQL 15 cluster in a temp folder of its own (owned by `nobody` when run as root: initdb
    and postgres refuse root, so they run as `nobody` through runuser) on a free loopback port, trust
    auth, superuser `rpcwatch`. Stopped (and the folder removed unless `keep`) on exit."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    data, port = folder / "data", free_port()
    ctl = [str(PG_BIN / "pg_ctl"), "-D", str(data)]
    try:
        for cmd in (
            [str(PG_BIN / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8"],
            [
                *ctl,
                "-o",
                f"-p {port} -k {folder} -c listen_addresses=127.0.0.1",
                "-l",
                str(folder / "log"),
                "-w",
                "start",
            ],
        ):
            done = subprocess.run(as_postgres_user(cmd), capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd[:2])} failed: {done.stderr[-2000:]}")
        yield Server("127.0.0.1", port, USER, folder)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(as_postgres_user([*ctl, "-m", "fast", "-w", "stop"]), check=False, capture_output=True)
        if keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
