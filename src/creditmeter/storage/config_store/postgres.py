"""The PostgreSQL configuration store: the `config_*` tables of the ledger's database, so
every server on a PostgreSQL ledger, on any machine, shares one set of keys, prices and
packs.

asyncpg is the project's PostgreSQL driver and this interface is blocking, so the store
runs a private event loop in a thread of its own, where its connection pool lives; each
method hands its coroutine to that loop and waits for the result. (A second, blocking
driver would mean a second set of connection settings, errors and bugs for the same
database.)

The queries and rules are `sql.SqlConfigStore`'s; a write transaction takes the store's
write lock by locking the version row.

The first open that finds the tables empty imports `<data dir>/config.db` if that has
rows: a deployment that ran on a PostgreSQL ledger before kept its configuration there.
Each load a server makes is also kept in `<data dir>/config-cache.json`, which a server
started while PostgreSQL does not answer serves from until it does (`last_known`)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import astuple
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from creditmeter.constants import CONFIG_CACHE_NAME, CONFIG_DB_NAME
from creditmeter.storage.config_store.base import (
    ConfigSnapshot,
    KeyRow,
    LimitRow,
    RateRow,
    RechargeRow,
)
from creditmeter.storage.config_store.schema import POSTGRES_SCHEMA
from creditmeter.storage.config_store.sql import Body, SqlConfigStore, Tables
from creditmeter.storage.config_store.sqlite import read_dump
from creditmeter.storage.ledger.base import ledger_unavailable
from creditmeter.storage.migrations import migrate_postgres
from creditmeter.storage.pg import CLOSE_TIMEOUT_S, DOWN, OnConnection, close_pool, on_pool

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Serializes opening (migrations, the import) across processes; not the ledger's key, so
#: a ledger and a config store opening at once do not wait for each other.
_SCHEMA_LOCK_KEY = 0x63726564_636F6E66  # "credconf"
#: Config calls are few (a version poll every half second, the odd change): a small pool.
_POOL_MAX_SIZE = 4
#: An idle connection is closed after this, so a store whose server stopped lets go.
_POOL_IDLE_S = 30.0
_CONNECT_TIMEOUT_S = 10.0
_COMMAND_TIMEOUT_S = 10.0
_CACHE_FORMAT = 1

TABLES = Tables("config_")
_STORE_ID = "SELECT value FROM config_meta WHERE name = 'store_id'"
#: The store's write lock: every write transaction takes it first.
_LOCK_VERSION = f"{TABLES.version} FOR UPDATE"


class _LoopThread:
    """A private event loop running in a daemon thread, with the store's pool on it.

    Kept apart from the store so that the store's finalizer can stop it (a finalizer must
    not hold the object it finalizes)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool: asyncpg.Pool | None = None
        self._closed = False
        self._guard = threading.Lock()
        self.thread = threading.Thread(target=self._serve, name="config-store", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # A call still in flight (the store closed under it) ends CancelledError in
            # its caller's thread rather than leaving that thread waiting for ever.
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            if self.pool is not None:
                self.pool.terminate()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for its result (or exception)."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a config store call from inside the store would wait forever")
        if self._closed:
            coro.close()
            raise RuntimeError("the config store is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _close_pool(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            await close_pool(pool)

    def stop(self) -> None:
        """Close the pool and end the thread; idempotent, from any thread."""
        with self._guard:
            if self._closed:
                return
            self._closed = True
        if threading.current_thread() is self.thread:
            # The garbage collector ran the finalizer on the loop's own thread: nothing
            # can be waited for here. The loop's ending terminates the pool.
            self.loop.stop()
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close_pool(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CLOSE_TIMEOUT_S)


class PostgresConfigStore(SqlConfigStore):
    """The configuration in PostgreSQL (`--ledger-url postgresql://...`), shared by every
    server on that database. `data_dir` is this server's: the SQLite store to import from
    and the cache of the last configuration loaded."""

    tables = TABLES

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.sqlite_path = data_dir / CONFIG_DB_NAME
        self.cache_path = data_dir / CONFIG_CACHE_NAME
        self._loop = _LoopThread()
        self._finalizer = weakref.finalize(self, self._loop.stop)
        #: Made on the private loop by the first call (asyncio objects belong to a loop).
        self._opening: asyncio.Lock | None = None
        self._store_id: int | None = None
        #: The version last written to the cache by this store.
        self._cached: int | None = None

    def close(self) -> None:
        self._finalizer()

    # --- the private loop ------------------------------------------------------------
    def _call(self, op: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
        return self._loop.run(self._run(op))

    async def _run(self, op: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
        """`op` on the pool, opening the store first if need be; once more if a pooled
        connection turns out dead (the server restarted or failed over since). A server
        that does not answer is BackendUnavailable, as for the ledger: the same database."""
        try:
            pool = await self._pool()
        except DOWN as error:
            raise ledger_unavailable() from error
        return await on_pool(pool, op)

    async def _pool(self) -> asyncpg.Pool:
        if self._loop.pool is not None:
            return self._loop.pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._loop.pool is None:
                self._loop.pool = await self._open()
        return self._loop.pool

    async def _open(self) -> asyncpg.Pool:
        """A pool on a database whose schema is current (and configuration imported)."""
        pool = await asyncpg.create_pool(
            self.url,
            min_size=0,  # no idle floor: asyncpg would keep reconnecting while it is down
            max_size=_POOL_MAX_SIZE,
            max_inactive_connection_lifetime=_POOL_IDLE_S,
            timeout=_CONNECT_TIMEOUT_S,
            command_timeout=_COMMAND_TIMEOUT_S,
            server_settings={"application_name": "creditmeter-config"},
        )
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
                await migrate_postgres(conn, POSTGRES_SCHEMA)
                await self._import_once(conn)
                self._store_id = int(await conn.fetchval(_STORE_ID))
        except BaseException:
            pool.terminate()
            raise
        return pool

    async def _import_once(self, conn: Any) -> None:
        """Import the SQLite store of this data directory into empty tables (under the
        schema lock: of servers opening at once, one imports, the others see its rows)."""
        if not self.sqlite_path.exists():
            return
        dump = await asyncio.to_thread(read_dump, self.sqlite_path)
        if dump.is_empty():
            return
        here = await conn.fetchrow(
            "SELECT (SELECT array_agg(key_id) FROM config_api_keys) AS keys,"
            " (SELECT array_agg(tenant || '/' || feature) FROM config_rates) AS rates,"
            " (SELECT array_agg(tenant || '/' || pack_id) FROM config_packs) AS packs,"
            " EXISTS (SELECT 1 FROM config_tenants) AS tenants"
        )
        if not (here["keys"] or here["rates"] or here["packs"] or here["tenants"]):
            await TABLES.insert_dump(OnConnection(conn), dump)
            await conn.execute(TABLES.bump)
            log.info(
                "imported the configuration in %s into PostgreSQL: %s",
                self.sqlite_path,
                dump.counts(),
            )
            return
        # Not empty: imported before (then every row below is here), or configured
        # afresh, or another data directory's imported first. Rows only this file has
        # were never carried over: say so, never merge them silently.
        missing = (
            len({k.key_id for k in dump.api_keys} - set(here["keys"] or ())),
            len({f"{r.tenant}/{r.feature}" for r in dump.rates} - set(here["rates"] or ())),
            len({f"{p.tenant}/{p.pack_id}" for p in dump.packs} - set(here["packs"] or ())),
        )
        if any(missing):
            log.warning(
                "%s holds %d API keys, %d rates and %d packs that the PostgreSQL config store"
                " does not; they were not imported (it was not empty): create them again",
                self.sqlite_path,
                *missing,
            )

    # --- transactions ---------------------------------------------------------------
    def _read(self, body: Body[T], snapshot: bool = False) -> T:
        async def read(db: asyncpg.Pool) -> T:
            async with db.acquire() as conn:
                if not snapshot:
                    return await body(OnConnection(conn))
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    return await body(OnConnection(conn))

        return self._call(read)

    def _write(self, body: Body[T]) -> T:
        async def write(db: asyncpg.Pool) -> T:
            async with db.acquire() as conn, conn.transaction():
                await conn.execute(_LOCK_VERSION)
                return await body(OnConnection(conn))

        return self._call(write)

    def snapshot(self) -> ConfigSnapshot:
        snapshot = super().snapshot()
        if snapshot.version != self._cached:
            try:
                self._remember(snapshot)
            except OSError as error:  # only a later start during an outage needs it
                log.warning("cannot keep the configuration in %s: %s", self.cache_path, error)
                self._cached = snapshot.version
        return snapshot

    # --- the last configuration seen --------------------------------------------------
    def _remember(self, snapshot: ConfigSnapshot) -> None:
        """Keep `snapshot` in the cache file, unless it already holds a later version of
        this database (several servers share a data directory under --workers N)."""
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.cache_path.with_name(self.cache_path.name + ".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held = _read_cache(self.cache_path)
            if (
                held is not None
                and held[0] == self._store_id
                and held[1].version >= snapshot.version
            ):
                self._cached = snapshot.version
                return
            body = {
                "format": _CACHE_FORMAT,
                "store_id": self._store_id,
                "version": snapshot.version,
                "api_keys": [astuple(k) for k in snapshot.api_keys],
                "rates": [astuple(r) for r in snapshot.rates],
                "limits": [astuple(r) for r in snapshot.limits],
                "recharges": [astuple(r) for r in snapshot.recharges],
            }
            # mkstemp makes it 0600: it holds the keys' digests, as config.db does.
            fd, tmp = tempfile.mkstemp(dir=self.cache_path.parent, prefix=".config-cache-")
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(body, out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.cache_path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        self._cached = snapshot.version

    def last_known(self) -> ConfigSnapshot | None:
        held = _read_cache(self.cache_path)
        if held is not None:
            log.info("configuration from %s (version %d)", self.cache_path, held[1].version)
            return held[1]
        if self.sqlite_path.exists():
            # This data directory never reached the PostgreSQL store: its configuration is
            # the SQLite store's, which the first open will import.
            dump = read_dump(self.sqlite_path)
            log.info("configuration from %s (not imported yet)", self.sqlite_path)
            return ConfigSnapshot(-1, dump.api_keys, dump.rates, dump.limits, dump.recharges)
        return None


def _read_cache(path: Path) -> tuple[int | None, ConfigSnapshot] | None:
    """The cache file's store id and snapshot; None if there is none or it is unreadable."""
    try:
        body = json.loads(path.read_text())
        if body.get("format") != _CACHE_FORMAT:
            return None
        keys = [KeyRow(*k) for k in body["api_keys"]]
        rates = [RateRow(*r) for r in body["rates"]]
        limits = [LimitRow(*r) for r in body.get("limits", ())]
        recharges = [RechargeRow(*r) for r in body.get("recharges", ())]
        snapshot = ConfigSnapshot(int(body["version"]), keys, rates, limits, recharges)
        return body.get("store_id"), snapshot
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("ignoring %s: %s", path, error)
        return None
