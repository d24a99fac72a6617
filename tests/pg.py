"""Fixtures: a real PostgreSQL server from Debian's packages, in a fresh temporary cluster on
a free loopback port, for the whole session. `postgres_server` can stop and start it again
(ledger downtime); `postgres_url` is a database on it.

The cluster is creditmeter.bench.postgres's (the bench's peer scenario runs the same one);
as root every server command runs as the `postgres` system user."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from creditmeter.bench.postgres import PostgresCluster, major
from creditmeter.bench.postgres import find_bindir as newest_bindir

DATABASE = "creditmeter"


def find_bindir() -> Path:
    """The newest Debian PostgreSQL server's bin directory, installing the package (as root)
    if no server is present."""
    found = newest_bindir()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "postgresql"],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        found = newest_bindir()
    assert found, "the PostgreSQL server is not installed: run ./scripts/test, which installs it"
    return found


class PostgresServer(PostgresCluster):
    """The tests' cluster: a non-C default collation (ICU, PostgreSQL 15+), so a query that
    relies on the database's collation instead of the ledger's COLLATE "C" orders
    differently."""

    def __init__(self, bindir: Path, root: Path) -> None:
        icu = ["--locale-provider=icu", "--icu-locale=en-US"] if major(bindir) >= 15 else []
        super().__init__(bindir, root, icu)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL server for the session; tests may stop and start it, but must
    leave it running."""
    bindir = find_bindir()
    # Under /tmp, not pytest's tmp_path: the postgres user must be able to reach it.
    root = Path(tempfile.mkdtemp(prefix="creditmeter-pg-", dir="/tmp"))
    root.chmod(0o755)
    server: PostgresServer | None = None
    try:
        server = PostgresServer(bindir, root)
        server.start()
        yield server
    finally:
        if server is not None:
            server.destroy()
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """`postgresql://...` for the session's ledger database (trust auth on loopback)."""
    postgres_server.create_database(DATABASE)
    return postgres_server.url(DATABASE)


@pytest.fixture
def fresh_postgres_url(postgres_server: PostgresServer) -> str:
    """`postgresql://...` for a new, empty database of the test's own on the session's
    server: tables nothing else writes (the config store imports only into empty ones;
    a server's reconciler acts on every staged grant in its ledger)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(name)
    return postgres_server.url(name)
