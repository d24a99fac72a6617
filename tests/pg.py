"""Fixtures: a real PostgreSQL server from Debian's packages, in a fresh temporary cluster on
a free loopback port, for the whole session. `postgres_server` can stop and start it again
(ledger downtime); `postgres_url` is a database on it.

PostgreSQL refuses to run as root, so as root every server command runs as the `postgres`
system user (which the Debian package creates)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

DATABASE = "creditmeter"
START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _major(bindir: str) -> int:
    """The major version in a Debian bindir, /usr/lib/postgresql/<major>/bin."""
    return int(Path(bindir).parent.name)


def find_bindir() -> Path:
    """The newest Debian PostgreSQL server's bin directory, installing the package (as root)
    if no server is present. `psql` alone is the client package, hence the `postgres` check."""
    found = sorted(
        (os.path.dirname(p) for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")),
        key=_major,
    )
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "postgresql"],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        return find_bindir()
    assert found, "the PostgreSQL server is not installed: run ./scripts/test, which installs it"
    return Path(found[-1])


class PostgresServer:
    """One throwaway PostgreSQL cluster: initdb'd on creation, then started and stopped at
    will; the port (and so every URL) stays the same across restarts."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.sockets = root / "run"
        self.log = root / "postgres.log"
        self.port = free_port()
        #: Seconds the last start() took, until the server accepted connections.
        self.start_seconds = 0.0
        self.sockets.mkdir()
        if os.geteuid() == 0:
            for path in (root, self.sockets):
                shutil.chown(path, "postgres", "postgres")
        # A non-C default collation (ICU, PostgreSQL 15+) so a query that relies on the
        # database's collation instead of the ledger's COLLATE "C" orders differently.
        icu = ["--locale-provider=icu", "--icu-locale=en-US"] if _major(str(bindir)) >= 15 else []
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
            "--locale=C.UTF-8", *icu, "--no-sync",
        )  # fmt: skip

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A PostgreSQL tool, as the cluster's owner: postgres when we are root, else us."""
        argv = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True)
        if check and done.returncode != 0:
            output = done.stderr or done.stdout
            raise RuntimeError(f"{tool} failed ({done.returncode}): {output}\n{self.log_tail()}")
        return done

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode == 0

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        began = time.monotonic()
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=on"
            " -c max_connections=200"
        )
        self._run(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", str(START_TIMEOUT_S),
        )  # fmt: skip
        # pg_ctl -w waits for the postmaster; make sure TCP on the port answers too.
        deadline = began + START_TIMEOUT_S
        while self._ready_check() != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not accept connections\n{self.log_tail()}")
            time.sleep(0.05)
        self.start_seconds = time.monotonic() - began

    def _ready_check(self) -> int:
        args = ("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres")
        return self._run("pg_isready", "-q", *args, check=False).returncode

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" disconnects clients and shuts down cleanly, "immediate"
        is a crash (recovery runs on the next start)."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w")

    @contextmanager
    def stopped(self, mode: str = "fast") -> Iterator[None]:
        """The server is down inside the block and running again after it."""
        self.stop(mode)
        try:
            yield
        finally:
            self.start()

    def create_database(self, name: str) -> None:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        if self.data.exists() and self.running:
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


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
