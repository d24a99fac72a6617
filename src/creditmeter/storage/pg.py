"""What the PostgreSQL ledger and the PostgreSQL configuration store share: which errors
mean the server is away, a pooled call retried once on a connection that died, closing a
pool, and statements (written with `?` markers, `storage/sql.py`) run on a connection."""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from creditmeter.storage.ledger.base import ledger_unavailable
from creditmeter.storage.sql import Row, Statements

T = TypeVar("T")

#: What a query on a pooled connection raises when the server closed it while idle, or
#: (InternalClientError, "cannot switch to state 12; another operation is in progress":
#: MagicStack/asyncpg#1069) terminated it while a statement was being sent, leaving the
#: connection's protocol state broken.
DEAD_CONNECTION = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    ConnectionResetError,
    asyncpg.exceptions.InternalClientError,
)
#: What a call raises while the server cannot be reached or is not accepting work.
DOWN = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InternalClientError,  # a connection broken mid-statement (above)
)
#: How long a pool is given to close its connections before they are cut.
CLOSE_TIMEOUT_S = 10.0


async def on_pool(pool: asyncpg.Pool, op: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """`op` on the pool; once more if a pooled connection turns out dead (the server
    restarted or failed over since it was last used): the others are as stale, so all are
    replaced. A server that does not answer is BackendUnavailable (`ledger_unavailable`).
    Safe for idempotent operations only."""
    try:
        try:
            return await op(pool)
        except DEAD_CONNECTION:
            await pool.expire_connections()
            return await op(pool)
    except DOWN as error:
        raise ledger_unavailable() from error


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close the pool, cutting its connections if they do not close in time."""
    try:
        await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
    except TimeoutError:
        pool.terminate()


@functools.lru_cache(maxsize=1024)
def numbered(sql: str) -> str:
    """`sql` with its `?` markers numbered `$1`, `$2`..., as asyncpg takes them."""
    numbers = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(numbers)}", sql)


def rows_changed(status: str) -> int:
    """The row count of a command tag ("INSERT 0 <rows>", "UPDATE <rows>", "DELETE 3")."""
    return int(status.rsplit(" ", 1)[1])


class OnConnection(Statements):
    """Statements on one asyncpg connection (inside its transaction, if it has one)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._conn.fetch(numbered(sql), *args))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return await self._conn.fetchrow(numbered(sql), *args)

    async def execute(self, sql: str, *args: Any) -> int:
        return rows_changed(await self._conn.execute(numbered(sql), *args))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(numbered(sql), rows)
