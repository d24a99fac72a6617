"""What the SQL stores (the ledger, `ledger/sql.py`, and the config store,
`config_store/sql.py`) share: statements written once with `?` markers, run through a
small seam that each backend provides over its driver.

The PostgreSQL backends number the markers (`pg.numbered`); SQLite takes them as they are.
Both SQLite backends open their files with `connect_wal`."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

#: A result row: a tuple (SQLite) or an asyncpg Record; the rules read columns by position.
Row = Any


def marks(count: int) -> str:
    """`count` parameter markers, comma-separated."""
    return ", ".join("?" * count)


def column_names(columns: str) -> list[str]:
    """The names of a comma-separated column list."""
    return [c.strip() for c in columns.split(",")]


def upsert(table: str, columns: str, key: int) -> str:
    """An INSERT of `columns` that, where a row has the same first `key` columns (the
    primary key), updates the others instead."""
    names = column_names(columns)
    updates = ", ".join(f"{c} = excluded.{c}" for c in names[key:])
    return (
        f"INSERT INTO {table} ({columns}) VALUES ({marks(len(names))})"
        f" ON CONFLICT ({', '.join(names[:key])}) DO UPDATE SET {updates}"
    )


class Statements(Protocol):
    """Where statements run: a connection (inside a transaction, or each statement on
    its own)."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it inserted, updated or deleted."""
        ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


#: The pause between tries of a journal-mode switch that found the file locked.
WAL_RETRY_PAUSE_S = 0.01


def connect_wal(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection to the SQLite file `path` in WAL mode with synchronous=FULL (a committed
    transaction survives power loss), in autocommit (transactions are explicit).

    Switching a new file to WAL takes an exclusive lock, and SQLite answers "database is
    locked" at once, without waiting the busy timeout, when another connection holds the
    file then: four servers (or `--workers 4`) opening a new data directory together hit
    it about one time in ten (measured). So the switch is tried again until the busy
    timeout has passed."""
    db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    deadline = time.monotonic() + busy_timeout_s
    try:
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() >= deadline:
                    raise
                time.sleep(WAL_RETRY_PAUSE_S)
        db.execute("PRAGMA synchronous=FULL")
    except BaseException:
        db.close()
        raise
    return db
