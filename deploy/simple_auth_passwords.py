"""Entrypoint of the Airflow api-server container (docker-compose.yml): sets the password of the
Airflow user `admin` from AIRFLOW_ADMIN_PASSWORD (.env) in SimpleAuthManager's passwords file, then
runs the given command (`airflow api-server`) with that variable removed from its environment.

The file (AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE) is JSON {user: password}, mode 600.
Other users listed in AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS keep their entries; the api-server
generates a password for any user that has none yet. Usage: simple_auth_passwords.py COMMAND [ARG...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ADMIN = "admin"


def main(argv: list[str]) -> None:
    password = os.environ.pop("AIRFLOW_ADMIN_PASSWORD", "")
    target = os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", "")
    if not password:
        sys.exit("AIRFLOW_ADMIN_PASSWORD is not set or empty: set it in .env (see .env.example)")
    if not target:
        sys.exit("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE is not set: where should the password go?")
    if not argv:
        sys.exit(__doc__)
    users = [u.split(":")[0] for u in os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "").split(",")]
    if os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS") and ADMIN not in users:
        print(f"warning: user {ADMIN!r} is not in AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", file=sys.stderr)

    path = Path(target)
    try:
        passwords = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        passwords = {}
    passwords[ADMIN] = password
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".passwords-")  # created with mode 600
    with os.fdopen(fd, "w") as out:
        json.dump(passwords, out)
        out.write("\n")
    os.replace(tmp, path)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
