"""What the PostgreSQL ledger and the PostgreSQL configuration store share: which errors
mean the server is away, a pooled call retried once on a connection that died, and closing
a pool."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from creditmeter.storage.ledger.base import ledger_unavailable

T = TypeVar("T")

#: What a query on a pooled connection raises when the server closed it while idle.
DEAD_CONNECTION = (asyncpg.exceptions.ConnectionDoesNotExistError, ConnectionResetError)
#: What a call raises while the server cannot be reached or is not accepting work.
DOWN = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
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
