"""The SQLite ledger, the default: one file in the data directory, WAL with
synchronous=FULL so a committed batch survives power loss. All database work runs on two
dedicated threads (one writer, one reader), never on the event loop; the queries and rules
are `sql.SqlLedger`'s."""

from __future__ import annotations

import asyncio
import operator
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from creditmeter.storage.ledger.base import (
    EVENT_COLUMNS,
    Event,
    Notice,
    Period,
    RequestRecord,
    ledger_unavailable,
    notice_row,
)
from creditmeter.storage.ledger.schema import SQLITE_SCHEMA
from creditmeter.storage.ledger.sql import (
    INSERT_NOTICE,
    REQUEST_COLUMNS,
    Dialect,
    SqlLedger,
    Statements,
    UniqueViolation,
)
from creditmeter.storage.migrations import migrate_sqlite
from creditmeter.storage.sql import Row, connect_wal, marks

T = TypeVar("T")

_PERIOD_FORMAT = {Period.DAY: "%Y-%m-%d", Period.MONTH: "%Y-%m"}
_INSERT_EVENTS = (
    f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({marks(len(Event._fields))})"
    " ON CONFLICT (event_id) DO NOTHING"
)
_INSERT_REQUESTS = (
    f"INSERT INTO requests ({REQUEST_COLUMNS}) VALUES ({marks(len(RequestRecord._fields))})"
    " ON CONFLICT DO NOTHING"
)
#: Sort keys of a batch: the tables' primary keys.
_event_key = operator.itemgetter(0)
_request_key = operator.itemgetter(0, 1, 2)
#: The writer's page cache (KiB; SQLite's default is 2 MiB). A batch inserts request ids
#: at random places in the requests key: with the default cache the pages it touches are
#: read again for every batch once the ledger is a few hundred MB (10 % of the insert
#: time at 320,000 entries, measured).
WRITER_CACHE_KIB = 64 * 1024
#: How long a write waits for another connection's lock before the ledger counts as down.
BUSY_TIMEOUT_S = 5.0
_UNAVAILABLE = ("locked", "busy", "disk", "I/O", "readonly", "unable to open", "full")


class SqliteDialect(Dialect):
    def any_of(self, column: str, values: Sequence[str]) -> tuple[str, list[Any]]:
        return f"{column} IN ({marks(len(values))})", list(values)

    def period(self, period: Period) -> str:
        return f"strftime('{_PERIOD_FORMAT[period]}', ts_ms / 1000, 'unixepoch')"


class _Worker:
    """One SQLite connection, used only from its own thread."""

    def __init__(self, path: Path, name: str, query_only: bool) -> None:
        self.path = path
        self.name = name
        self.query_only = query_only
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)

        def connect() -> None:
            db = connect_wal(self.path, BUSY_TIMEOUT_S)
            if self.query_only:
                db.execute("PRAGMA query_only=ON")
            else:
                db.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
                try:
                    migrate_sqlite(db, SQLITE_SCHEMA)
                except BaseException:
                    db.close()  # a newer schema, say: the ledger stays closed
                    raise
            self._db = db

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None:
            raise ledger_unavailable()  # not open (yet, or any more)

        def call() -> T:
            assert self._db is not None
            return fn(self._db)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except sqlite3.OperationalError as error:
            # Locked past the busy timeout, disk full, I/O error, unwritable file: the
            # ledger is down for now. (Other SQLite errors are bugs and stay as they are.)
            if any(sign in str(error) for sign in _UNAVAILABLE):
                raise ledger_unavailable() from error
            raise

    async def close(self) -> None:
        if self._executor is None:
            return

        def disconnect() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, disconnect)
        self._executor.shutdown(wait=True)
        self._executor = None


class _OnWorker(Statements):
    """Statements run on a worker's thread. The writer's go through `lock` (each statement
    on its own), except inside a transaction, which holds the lock for all of them."""

    def __init__(self, worker: _Worker, lock: asyncio.Lock | None = None) -> None:
        self._worker = worker
        self._lock = lock

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._lock is None:
            return await self._worker.run(fn)
        async with self._lock:
            return await self._worker.run(fn)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._call(lambda db: db.execute(sql, args).fetchall())

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return await self._call(lambda db: db.execute(sql, args).fetchone())

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._call(lambda db: db.execute(sql, args).rowcount)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._call(lambda db: db.executemany(sql, rows))

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        await self.execute("SAVEPOINT nested")
        try:
            yield
        except BaseException as error:
            await self.execute("ROLLBACK TO nested")
            await self.execute("RELEASE nested")
            if isinstance(error, sqlite3.IntegrityError) and "UNIQUE" in str(error):
                raise UniqueViolation(str(error)) from error
            raise
        await self.execute("RELEASE nested")


class SqliteLedger(SqlLedger):
    dialect = SqliteDialect()

    def __init__(self, path: Path) -> None:
        self.path = path
        # Writes go through one connection on one thread (SQLite has one writer anyway);
        # reads through another, so WAL lets history and reports be read while a write
        # waits for the lock.
        self._writer = _Worker(path, "sqlite-ledger-writer", query_only=False)
        self._reader = _Worker(path, "sqlite-ledger-reader", query_only=True)
        #: Held by each use of the writer: a transaction's statements are not interleaved
        #: with other callers'.
        self._write_lock = asyncio.Lock()
        self._reads = _OnWorker(self._reader)
        self._writes = _OnWorker(self._writer, self._write_lock)
        self._in_transaction = _OnWorker(self._writer)

    async def _transaction(self, body: Callable[[Statements], Awaitable[T]]) -> T:
        """`body` inside BEGIN IMMEDIATE (the database's write lock, taken up front)."""
        run = self._writer.run
        async with self._write_lock:
            await run(lambda db: db.execute("BEGIN IMMEDIATE"))
            try:
                result = await body(self._in_transaction)
                await run(lambda db: db.execute("COMMIT"))
            except BaseException:
                await run(lambda db: db.in_transaction and db.execute("ROLLBACK"))
                raise
            return result

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._writer.open()  # creates the schema before the reader looks
        await self._reader.open()

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    async def ping(self) -> None:
        def check(db: sqlite3.Connection) -> None:
            # A write probe: a read-only or full disk must count as down.
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")

        async with self._write_lock:
            await self._writer.run(check)

    async def append(
        self,
        events: Sequence[Event],
        requests: Sequence[RequestRecord],
        notices: Sequence[Notice] = (),
    ) -> int:
        # The flusher's hot path: one trip to the writer's thread for the whole batch.
        # Events and records are their rows. In key order: request ids are random, and
        # inserting them sorted walks the primary key's B-tree once instead of jumping
        # around it.
        rows = sorted(events, key=_event_key)
        reqs = sorted(requests, key=_request_key)
        notice_rows = [notice_row(n) for n in notices]

        def write(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            try:
                before = db.total_changes
                db.executemany(_INSERT_EVENTS, rows)
                inserted = db.total_changes - before
                db.executemany(_INSERT_REQUESTS, reqs)
                if notice_rows:
                    db.executemany(INSERT_NOTICE, notice_rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return inserted

        async with self._write_lock:
            return await self._writer.run(write)
