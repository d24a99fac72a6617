"""The PostgreSQL ledger (`--ledger-url postgresql://...`), for several servers sharing one
ledger. asyncpg with a connection pool; the queries and rules are `sql.SqlLedger`'s, as
for the SQLite ledger. What is PostgreSQL's own: numbered parameters, row locks, and the
flusher's append by COPY.

Every text column is `COLLATE "C"`: ordering and keyset comparisons then follow byte order,
as in SQLite, whatever the database's default collation is."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from creditmeter.storage.ledger.base import (
    EVENT_COLUMNS,
    Event,
    Notice,
    Period,
    RequestRecord,
    ledger_unavailable,
    notice_row,
)
from creditmeter.storage.ledger.schema import POSTGRES_SCHEMA
from creditmeter.storage.ledger.sql import (
    INSERT_NOTICE,
    REQUEST_COLUMNS,
    Dialect,
    SqlLedger,
    Statements,
    UniqueViolation,
)
from creditmeter.storage.migrations import migrate_postgres
from creditmeter.storage.pg import DOWN, OnConnection, close_pool, numbered, on_pool, rows_changed
from creditmeter.storage.sql import Row

T = TypeVar("T")

#: Serializes the schema's migrations across processes (two servers opening one new
#: database at once); any fixed 64-bit number.
_SCHEMA_LOCK_KEY = 0x63726564_6D657472  # "credmetr"
_POOL_MAX_SIZE = 10
_CONNECT_TIMEOUT_S = 10.0
#: A statement that takes longer fails rather than stalling the flusher forever (a
#: half-open connection to a vanished server never errors on its own).
_COMMAND_TIMEOUT_S = 60.0
_PERIOD_FORMAT = {Period.DAY: "YYYY-MM-DD", Period.MONTH: "YYYY-MM"}

_EVENT_TYPES = (
    "text", "text", "text", "text", "text", "bigint", "text", "bigint", "text", "bigint",
    "bigint", "text", "bigint", "bigint", "bigint", "text", "text", "boolean", "boolean",
)  # fmt: skip
_REQUEST_TYPES = ("text", "text", "text", "text", "text", "text", "bigint")

# A batch goes in by COPY (binary, no statement parameters: a tenth of the client's time
# of the unnest of one array per column it replaced, and ahead of executemany, measured).
# COPY cannot skip rows already present, and a re-delivered batch holds them, so it copies
# into a staging table and one INSERT ... SELECT ... ON CONFLICT DO NOTHING moves the new
# rows over, in the batch's transaction. The staging tables are temporary, made once per
# connection (the pool's init: no DDL per batch) and emptied by every commit.
_EVENTS_STAGING = "events_batch"
_REQUESTS_STAGING = "requests_batch"


def _staging_table(name: str, columns: str, types: Sequence[str]) -> str:
    names = [c.strip() for c in columns.split(",")]
    collate = {"text": ' COLLATE "C"'}  # the tables' order, for ORDER BY
    typed = ", ".join(f"{c} {t}{collate.get(t, '')}" for c, t in zip(names, types, strict=True))
    return f"CREATE TEMPORARY TABLE {name} ({typed}) ON COMMIT DELETE ROWS;"


_CREATE_STAGING = _staging_table(_EVENTS_STAGING, EVENT_COLUMNS, _EVENT_TYPES) + _staging_table(
    _REQUESTS_STAGING, REQUEST_COLUMNS, _REQUEST_TYPES
)
# In key order: two processes appending overlapping batches take the row locks in the
# same order and cannot deadlock.
_INSERT_EVENTS = (
    f"INSERT INTO events ({EVENT_COLUMNS}) SELECT {EVENT_COLUMNS} FROM {_EVENTS_STAGING}"
    " ORDER BY event_id ON CONFLICT (event_id) DO NOTHING"
)
_INSERT_REQUESTS = (
    f"INSERT INTO requests ({REQUEST_COLUMNS}) SELECT {REQUEST_COLUMNS} FROM {_REQUESTS_STAGING}"
    " ORDER BY tenant, account, request_id ON CONFLICT (tenant, account, request_id) DO NOTHING"
)


async def _create_staging(conn: asyncpg.Connection) -> None:
    await conn.execute(_CREATE_STAGING)


class PostgresDialect(Dialect):
    # complete_purchase locks the purchase it completes; racing claims of deliveries or
    # expiries, and prunes, skip the rows another transaction holds.
    lock_rows = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def any_of(self, column: str, values: Sequence[str]) -> tuple[str, list[Any]]:
        return f"{column} = ANY(?::text[])", [list(values)]

    def period(self, period: Period) -> str:
        return (
            f"to_char(to_timestamp(ts_ms / 1000.0) AT TIME ZONE 'UTC', '{_PERIOD_FORMAT[period]}')"
            ' COLLATE "C"'
        )


class _OnConnection(OnConnection, Statements):
    """The ledger's statements on one connection inside its transaction."""

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        try:
            async with self._conn.transaction():
                yield
        except asyncpg.UniqueViolationError as error:
            raise UniqueViolation(str(error)) from error


class _OnPool(Statements):
    """Each statement on a pooled connection of its own (committed on its own)."""

    def __init__(self, ledger: PostgresLedger) -> None:
        self._ledger = ledger

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._ledger._run(lambda db: db.fetch(numbered(sql), *args)))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return await self._ledger._run(lambda db: db.fetchrow(numbered(sql), *args))

    async def execute(self, sql: str, *args: Any) -> int:
        return rows_changed(await self._ledger._run(lambda db: db.execute(numbered(sql), *args)))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._ledger._run(lambda db: db.executemany(numbered(sql), rows))

    def savepoint(self) -> Any:
        raise TypeError("a savepoint needs a transaction")


class PostgresLedger(SqlLedger):
    dialect = PostgresDialect()

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None
        self._reads = self._writes = _OnPool(self)

    async def _run(self, op: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
        """`op` on the pool; once more if a pooled connection turns out dead (the server
        restarted or failed over since it was last used). Safe: every ledger operation is
        idempotent (though if the connection died after a COMMIT went out, the retried
        append counts those events as already present)."""
        pool = self._pool
        if pool is None:
            raise ledger_unavailable()  # not open yet (the ledger did not answer) or closed
        return await on_pool(pool, op)

    async def _transaction(self, body: Callable[[Statements], Awaitable[T]]) -> T:
        async def run(db: asyncpg.Pool) -> T:
            async with db.acquire() as conn, conn.transaction():
                return await body(_OnConnection(conn))

        return await self._run(run)

    async def open(self) -> None:
        pool = await asyncpg.create_pool(
            self.url,
            # No floor of idle connections: asyncpg would keep reconnecting (and logging a
            # traceback each time) while the server is down.
            min_size=0,
            max_size=_POOL_MAX_SIZE,
            timeout=_CONNECT_TIMEOUT_S,
            command_timeout=_COMMAND_TIMEOUT_S,
            server_settings={"application_name": "creditmeter"},
            init=_create_staging,
        )
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
                await migrate_postgres(conn, POSTGRES_SCHEMA)
        except BaseException as error:
            pool.terminate()
            if isinstance(error, DOWN):  # not a configuration error: worth trying again
                raise ledger_unavailable() from error
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await close_pool(pool)

    async def ping(self) -> None:
        # Connecting proves the server is up; a standby or read-only server is still down
        # for a ledger.
        row = await self._run(
            lambda db: db.fetchrow(
                "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')"
            )
        )
        if row[0] or row[1] == "on":
            raise ledger_unavailable() from ConnectionError("the PostgreSQL server is read-only")

    async def append(
        self,
        events: Sequence[Event],
        requests: Sequence[RequestRecord],
        notices: Sequence[Notice] = (),
    ) -> int:
        async def write(db: asyncpg.Pool) -> int:
            inserted = 0
            async with db.acquire() as conn, conn.transaction():
                # Events and records are their rows, in the staging tables' column order.
                if events:
                    await conn.copy_records_to_table(_EVENTS_STAGING, records=events)
                    inserted = rows_changed(await conn.execute(_INSERT_EVENTS))
                if requests:
                    await conn.copy_records_to_table(_REQUESTS_STAGING, records=requests)
                    await conn.execute(_INSERT_REQUESTS)
                if notices:
                    await conn.executemany(
                        numbered(INSERT_NOTICE), sorted(notice_row(n) for n in notices)
                    )
            return inserted

        return await self._run(write)
