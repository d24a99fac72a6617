"""The SQLite configuration store: `<data dir>/config.db` (WAL, synchronous=FULL), the
embedded default. One file, so one machine: servers that share a PostgreSQL ledger share
its configuration store instead (`postgres.py`). The queries and rules are
`sql.SqlConfigStore`'s.

The rules are coroutines (PostgreSQL's driver is asyncio); here every statement is a
blocking sqlite3 call that never suspends, so a rule runs to its end in one step on the
caller's thread (`run_now`), and the store stays a blocking one."""

from __future__ import annotations

import sqlite3
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from creditmeter.storage.config_store.base import ConfigDump, PackRow, WebhookRow
from creditmeter.storage.config_store.schema import SQLITE_SCHEMA
from creditmeter.storage.config_store.sql import REQUEST_COLUMNS, Body, SqlConfigStore, Tables
from creditmeter.storage.migrations import migrate_sqlite
from creditmeter.storage.sql import Row, Statements, connect_wal

T = TypeVar("T")

#: How long a connection waits for another's write lock.
BUSY_TIMEOUT_S = 10.0
TABLES = Tables("")


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (its statements are sqlite3 calls)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a SQLite config store statement suspended")


class _OnSqlite(Statements):
    """Statements on a sqlite3 connection, each run when awaited."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return self._db.execute(sql, args).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return self._db.execute(sql, args).fetchone()

    async def execute(self, sql: str, *args: Any) -> int:
        return self._db.execute(sql, args).rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)


class SqliteConfigStore(SqlConfigStore):
    """SQLite-backed configuration. Safe to use from several processes at once."""

    tables = TABLES

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            migrate_sqlite(db, SQLITE_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = connect_wal(self.path, BUSY_TIMEOUT_S)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    def _read(self, body: Body[T], snapshot: bool = False) -> T:
        with self._connect() as db:
            if not snapshot:
                return run_now(body(_OnSqlite(db)))
            db.execute("BEGIN")  # one read transaction: the rows of one version
            try:
                return run_now(body(_OnSqlite(db)))
            finally:
                db.execute("COMMIT")

    def _write(self, body: Body[T]) -> T:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # the database's one write lock, taken up front
            try:
                result = run_now(body(_OnSqlite(db)))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result


def read_dump(path: Path) -> ConfigDump:
    """Every row of the config store in `path` (made by this release or 0.1.0, which share
    the schema), read-only: the file is left exactly as it is."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        db.execute("BEGIN")
        return run_now(_dump(_OnSqlite(db), _tables(db)))
    finally:
        db.close()


async def _dump(c: Statements, present: set[str]) -> ConfigDump:
    t = TABLES
    # A store of 0.1.0 (or 0.2.0) has no usage limits, recharge policies or webhooks yet.
    return ConfigDump(
        tenants=[
            (str(a), int(b)) for a, b in await c.fetch("SELECT tenant, created_ms FROM tenants")
        ],
        api_keys=await t.read_keys(c),
        rates=await t.read_rates(c),
        packs=[PackRow(*r) for r in await c.fetch(f"{t.packs} ORDER BY tenant, pack_id")],
        limits=await t.read_limits(c) if "usage_limits" in present else [],
        recharges=await t.read_recharges(c) if "recharge_policies" in present else [],
        webhooks=[
            WebhookRow(*r) for r in await c.fetch(f"{t.webhooks} ORDER BY tenant, endpoint_id")
        ]
        if "webhook_endpoints" in present
        else [],
        requests=[
            (str(a), str(r), str(f), str(s), int(m))
            for a, r, f, s, m in await c.fetch(
                f"SELECT {REQUEST_COLUMNS} FROM requests"
            )
        ],
    )


def _tables(db: sqlite3.Connection) -> set[str]:
    return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
