"""A throw-away PostgreSQL cluster from Debian's `postgresql`, run as an unprivileged user.

PostgreSQL refuses to run as root, so under root the cluster belongs to the `postgres`
system user (created by the Debian package); otherwise to the current user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.harness.ports import free_port, wait_for_port

SUPERUSER = "kvmeter"


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError(
            "PostgreSQL server binaries not found: apt-get install postgresql (make deps does)"
        )
    return Path(found[-1]).parent


class Cluster:
    def __init__(self) -> None:
        # Not under pytest's tmp dirs: those are 0700 root, which the `postgres` user cannot traverse.
        self.base = Path(tempfile.mkdtemp(prefix="kvmeter-pg-"))
        self.data = self.base / "data"
        self.port = free_port()
        self.bin = _bindir()
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout}{result.stderr}"
            )

    def start(self) -> Cluster:
        if os.geteuid() == 0:
            shutil.chown(self.base, self.user, self.user)
            self.base.chmod(0o700)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--no-sync")
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.base / "log"), "-w", "start")
        wait_for_port("127.0.0.1", self.port, 30, "PostgreSQL")
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"


def create_database(admin_dsn: str) -> str:
    """Create an empty database next to `admin_dsn` and return its DSN."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_dsn.rsplit("/", 1)[0] + "/" + name
