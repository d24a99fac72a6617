"""A throwaway PostgreSQL cluster from Debian's server package, on a free loopback port:
the bench's `peer` scenario and the tests' ledger fixtures (tests/pg.py) both run one.
Owned by the `postgres` user when we are root (initdb refuses root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from creditmeter.bench.ledger import free_port

START_TIMEOUT_S = 60
#: The database initdb makes.
INITIAL_DATABASE = "postgres"


def major(bindir: Path) -> int:
    """The major version of a Debian bindir, /usr/lib/postgresql/<major>/bin."""
    return int(bindir.parent.name)


def find_bindir(tool: str = "postgres") -> Path | None:
    """The newest Debian PostgreSQL server's bin directory that has `tool`, or None.
    (`psql` alone is the client package: a server has `postgres`.)"""
    found = [
        Path(p).parent
        for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")
        if (Path(p).parent / tool).exists()
    ]
    return max(found, key=major, default=None)


class PostgresCluster:
    """One cluster: initdb'd on creation (`initdb_args` added), then started and stopped at
    will; the port (and so every URL) stays the same across restarts."""

    def __init__(self, bindir: Path, root: Path, initdb_args: Sequence[str] = ()) -> None:
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
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
            "--locale=C.UTF-8", *initdb_args, "--no-sync",
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
    def connection(self) -> list[str]:
        """The arguments of a client tool (psql, pgbench) to reach the cluster."""
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]

    @property
    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode == 0

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        began = time.monotonic()
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=on"
            " -c synchronous_commit=on -c max_connections=200"
        )
        self._run(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", str(START_TIMEOUT_S),
        )  # fmt: skip
        # pg_ctl -w waits for the postmaster; make sure TCP on the port answers too.
        deadline = began + START_TIMEOUT_S
        ready = ("pg_isready", "-q", *self.connection, "-d", INITIAL_DATABASE)
        while self._run(*ready, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not accept connections\n{self.log_tail()}")
            time.sleep(0.05)
        self.start_seconds = time.monotonic() - began

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
        self._run("createdb", *self.connection, name)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = INITIAL_DATABASE) -> str:
        """Run `sql`; its output, unaligned and without headers."""
        done = subprocess.run(
            [str(self.bindir / "psql"), *self.connection, "-d", database, "-v",
             "ON_ERROR_STOP=1", "-q", "-At"],
            input=sql, capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout

    def destroy(self) -> None:
        """Stop it if it runs and remove its files."""
        if self.data.exists() and self.running:
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
