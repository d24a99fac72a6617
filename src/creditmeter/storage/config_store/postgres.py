"""The PostgreSQL configuration store: the `config_*` tables of the ledger's database, so
every server on a PostgreSQL ledger, on any machine, shares one set of keys, prices and
packs.

asyncpg is the project's PostgreSQL driver and this interface is blocking, so the store
runs a private event loop in a thread of its own, where its connection pool lives; each
method hands its coroutine to that loop and waits for the result. (A second, blocking
driver would mean a second set of connection settings, errors and bugs for the same
database.)

Every write transaction first locks the version row: config writes (keys, rates, packs:
rare) are serialized across all servers, cannot deadlock, and the version moves in commit
order. The request record is claimed by its primary key (`INSERT ... ON CONFLICT DO
NOTHING`) before the change runs, so a request id changes the configuration once however
many servers race it.

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
from dataclasses import asdict, astuple
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from creditmeter.constants import CONFIG_CACHE_NAME, CONFIG_DB_NAME
from creditmeter.errors import Rejected
from creditmeter.storage.config_store.base import (
    ConfigDump,
    ConfigSnapshot,
    ConfigStore,
    KeyRow,
    LimitRow,
    PackRow,
    RateRow,
    RechargeRow,
    Request,
    WebhookRow,
)
from creditmeter.storage.config_store.schema import POSTGRES_SCHEMA
from creditmeter.storage.config_store.sqlite import read_dump
from creditmeter.storage.ledger.base import ledger_unavailable
from creditmeter.storage.migrations import migrate_postgres
from creditmeter.storage.pg import CLOSE_TIMEOUT_S, DOWN, close_pool, on_pool

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

_VERSION = "SELECT value FROM config_meta WHERE name = 'config_version'"
_STORE_ID = "SELECT value FROM config_meta WHERE name = 'store_id'"
_LOCK_VERSION = f"{_VERSION} FOR UPDATE"
_BUMP = "UPDATE config_meta SET value = value + 1 WHERE name = 'config_version'"
_KEY_COLUMNS = "key_id, tenant, role, secret_hash, label, created_ms, revoked_ms"
_RATE_COLUMNS = "tenant, feature, credits_per_unit, unit, increment_s, updated_ms"
_PACK_COLUMNS = (
    "tenant, pack_id, name, description, credits, bonus_credits, price_minor, currency,"
    " validity_days, recurrence, rollover_cap, priority, active, trial, archived, create_ms,"
    " update_ms"
)
_REQUEST_COLUMNS = "tenant, request_id, fingerprint, response, created_ms"
_LIMIT_COLUMNS = "tenant, feature, period, max_usage, unit, updated_ms"
_LIMITS = f"SELECT {_LIMIT_COLUMNS} FROM config_usage_limits ORDER BY tenant, feature, period"
_UPSERT_LIMIT = (
    f"INSERT INTO config_usage_limits ({_LIMIT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
    " ON CONFLICT (tenant, feature, period) DO UPDATE SET max_usage = excluded.max_usage,"
    " unit = excluded.unit, updated_ms = excluded.updated_ms"
)
_DELETE_LIMIT = "DELETE FROM config_usage_limits WHERE tenant = $1 AND feature = $2 AND period = $3"
_RECHARGE_COLUMNS = "tenant, threshold, pack_id, updated_ms"
_RECHARGES = f"SELECT {_RECHARGE_COLUMNS} FROM config_recharge_policies ORDER BY tenant"
_UPSERT_RECHARGE = (
    f"INSERT INTO config_recharge_policies ({_RECHARGE_COLUMNS}) VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (tenant) DO UPDATE SET threshold = excluded.threshold,"
    " pack_id = excluded.pack_id, updated_ms = excluded.updated_ms"
)
_DELETE_RECHARGE = "DELETE FROM config_recharge_policies WHERE tenant = $1"
_WEBHOOK_COLUMNS = (
    "tenant, endpoint_id, url, event_types, thresholds, description, secret, disabled,"
    " disabled_reason, failing_since_ms, create_ms, update_ms"
)
_WEBHOOKS = f"SELECT {_WEBHOOK_COLUMNS} FROM config_webhook_endpoints"
_UPSERT_WEBHOOK = (
    f"INSERT INTO config_webhook_endpoints ({_WEBHOOK_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
    " ON CONFLICT (tenant, endpoint_id) DO UPDATE SET url = excluded.url,"
    " event_types = excluded.event_types, thresholds = excluded.thresholds,"
    " description = excluded.description, secret = excluded.secret,"
    " disabled = excluded.disabled, disabled_reason = excluded.disabled_reason,"
    " failing_since_ms = excluded.failing_since_ms, update_ms = excluded.update_ms"
)
_KEYS = f"SELECT {_KEY_COLUMNS} FROM config_api_keys"
_RATES = f"SELECT {_RATE_COLUMNS} FROM config_rates ORDER BY tenant, feature"
_PACK = f"SELECT {_PACK_COLUMNS} FROM config_packs WHERE tenant = $1 AND pack_id = $2"


def _marks(count: int) -> str:
    return ", ".join(f"${i}" for i in range(1, count + 1))


_INSERT_TENANT = (
    "INSERT INTO config_tenants (tenant, created_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING"
)
_INSERT_KEY = f"INSERT INTO config_api_keys ({_KEY_COLUMNS}) VALUES ({_marks(7)})"
_INSERT_RATE = f"INSERT INTO config_rates ({_RATE_COLUMNS}) VALUES ({_marks(6)})"
_UPSERT_RATE = (
    f"{_INSERT_RATE} ON CONFLICT (tenant, feature) DO UPDATE"
    " SET credits_per_unit = excluded.credits_per_unit, unit = excluded.unit,"
    " increment_s = excluded.increment_s, updated_ms = excluded.updated_ms"
)
_INSERT_PACK = f"INSERT INTO config_packs ({_PACK_COLUMNS}) VALUES ({_marks(17)})"
_UPSERT_PACK = f"{_INSERT_PACK} ON CONFLICT (tenant, pack_id) DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in _PACK_COLUMNS.replace(" ", "").split(",")[2:]
)
_INSERT_REQUEST = f"INSERT INTO config_requests ({_REQUEST_COLUMNS}) VALUES ({_marks(5)})"
#: Claims a request id: nothing when a record holds it (a racing claim waits here until
#: the other transaction commits or rolls back, then does nothing or claims).
_CLAIM_REQUEST = f"{_INSERT_REQUEST} ON CONFLICT (tenant, request_id) DO NOTHING RETURNING 1"


def _rows_changed(status: str) -> int:
    """The row count of a command tag: "UPDATE 1", "INSERT 0 1", "DELETE 3"."""
    return int(status.rsplit(" ", 1)[1])


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


class PostgresConfigStore(ConfigStore):
    """The configuration in PostgreSQL (`--ledger-url postgresql://...`), shared by every
    server on that database. `data_dir` is this server's: the SQLite store to import from
    and the cache of the last configuration loaded."""

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
            await _insert_dump(conn, dump)
            await conn.execute(_BUMP)
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

    # --- reads ------------------------------------------------------------------------
    def version(self) -> int:
        return int(self._call(lambda db: db.fetchval(_VERSION)))

    def snapshot(self) -> ConfigSnapshot:
        async def read(db: asyncpg.Pool) -> ConfigSnapshot:
            async with (
                db.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                version = int(await conn.fetchval(_VERSION))
                keys = await conn.fetch(f"{_KEYS} ORDER BY created_ms, key_id")
                rates = await conn.fetch(_RATES)
                limits = await conn.fetch(_LIMITS)
                recharges = await conn.fetch(_RECHARGES)
            return ConfigSnapshot(
                version,
                [KeyRow(*r) for r in keys],
                [RateRow(*r) for r in rates],
                [LimitRow(*r) for r in limits],
                [RechargeRow(*r) for r in recharges],
            )

        snapshot = self._call(read)
        if snapshot.version != self._cached:
            try:
                self._remember(snapshot)
            except OSError as error:  # only a later start during an outage needs it
                log.warning("cannot keep the configuration in %s: %s", self.cache_path, error)
                self._cached = snapshot.version
        return snapshot

    def api_keys(self, tenant: str | None = None) -> list[KeyRow]:
        if tenant is None:
            rows = self._call(lambda db: db.fetch(f"{_KEYS} ORDER BY created_ms, key_id"))
        else:
            sql = f"{_KEYS} WHERE tenant = $1 ORDER BY created_ms, key_id"
            rows = self._call(lambda db: db.fetch(sql, tenant))
        return [KeyRow(*r) for r in rows]

    def rates(self) -> list[RateRow]:
        return [RateRow(*r) for r in self._call(lambda db: db.fetch(_RATES))]

    def pack(self, tenant: str, pack_id: str) -> PackRow | None:
        row = self._call(lambda db: db.fetchrow(_PACK, tenant, pack_id))
        return None if row is None else PackRow(*row)

    def packs(
        self, tenant: str, include_inactive: bool, limit: int, after: tuple[int, str] | None
    ) -> list[PackRow]:
        sql = f"SELECT {_PACK_COLUMNS} FROM config_packs WHERE tenant = $1"
        params: list[object] = [tenant]
        if not include_inactive:
            sql += " AND active AND NOT archived"
        if after is not None:
            sql += " AND (create_ms, pack_id) > ($2, $3)"
            params.extend(after)
        params.append(limit)
        sql += f" ORDER BY create_ms, pack_id LIMIT ${len(params)}"
        return [PackRow(*r) for r in self._call(lambda db: db.fetch(sql, *params))]

    # --- writes -----------------------------------------------------------------------
    def _write(self, change: Callable[[Any], Awaitable[tuple[T, bool]]]) -> T:
        """`change(conn)` in a write transaction that holds the version row's lock from
        its start and bumps the version if `change` says it changed anything."""

        async def write(db: asyncpg.Pool) -> T:
            async with db.acquire() as conn, conn.transaction():
                await conn.execute(_LOCK_VERSION)
                result, changed = await change(conn)
                if changed:
                    await conn.execute(_BUMP)
                return result

        return self._call(write)

    def add_key(self, row: KeyRow) -> None:
        async def change(conn: Any) -> tuple[None, bool]:
            await conn.execute(_INSERT_TENANT, row.tenant, row.created_ms)
            await conn.execute(_INSERT_KEY, *astuple(row)[:6], None)
            return None, True

        self._write(change)

    def revoke_key(self, key_id: str, now_ms: int) -> bool:
        async def change(conn: Any) -> tuple[bool, bool]:
            status = await conn.execute(
                "UPDATE config_api_keys SET revoked_ms = $1"
                " WHERE key_id = $2 AND revoked_ms IS NULL",
                now_ms,
                key_id,
            )
            revoked = _rows_changed(status) == 1
            return revoked, revoked

        return self._write(change)

    def _idempotent(
        self, req: Request, change: Callable[[Any], Awaitable[str]]
    ) -> tuple[str, bool]:
        """Run `change` once per request id, atomically with the record of its response;
        see `ConfigStore.set_rate`."""

        async def claimed(conn: Any) -> tuple[tuple[str, bool], bool]:
            await conn.execute(
                "DELETE FROM config_requests WHERE created_ms < $1", req.now_ms - req.ttl_ms
            )
            # The record is claimed first, with an empty response that the same
            # transaction fills in: it is never seen empty.
            claim = await conn.fetchval(
                _CLAIM_REQUEST, req.tenant, req.request_id, req.fingerprint, "", req.now_ms
            )
            if claim is None:
                prior = await conn.fetchrow(
                    "SELECT fingerprint, response FROM config_requests"
                    " WHERE tenant = $1 AND request_id = $2",
                    req.tenant,
                    req.request_id,
                )
                if prior["fingerprint"] != req.fingerprint:
                    raise Rejected("IDEMPOTENCY_KEY_REUSED", {"request_id": req.request_id})
                return (str(prior["response"]), True), False
            response = await change(conn)
            await conn.execute(
                "UPDATE config_requests SET response = $3 WHERE tenant = $1 AND request_id = $2",
                req.tenant,
                req.request_id,
                response,
            )
            return (response, False), True

        return self._write(claimed)

    def set_rate(self, row: RateRow, req: Request) -> tuple[str, bool]:
        async def change(conn: Any) -> str:
            await conn.execute(_UPSERT_RATE, *astuple(row))
            return str(row.updated_ms)

        return self._idempotent(req, change)

    def usage_limits(self) -> list[LimitRow]:
        return [LimitRow(*r) for r in self._call(lambda db: db.fetch(_LIMITS))]

    def set_usage_limit(
        self, tenant: str, feature: str, period: str, row: LimitRow | None, req: Request
    ) -> tuple[str, bool]:
        async def change(conn: Any) -> str:
            if row is None:
                await conn.execute(_DELETE_LIMIT, tenant, feature, period)
                return ""
            await conn.execute(_UPSERT_LIMIT, *astuple(row))
            return str(row.updated_ms)

        return self._idempotent(req, change)

    def set_recharge_policy(
        self, tenant: str, row: RechargeRow | None, req: Request
    ) -> tuple[str, bool]:
        async def change(conn: Any) -> str:
            if row is None:
                await conn.execute(_DELETE_RECHARGE, tenant)
                return ""
            await conn.execute(_UPSERT_RECHARGE, *astuple(row))
            return str(row.updated_ms)

        return self._idempotent(req, change)

    def put_pack(
        self, pack_id: str, req: Request, build: Callable[[PackRow | None], PackRow]
    ) -> tuple[PackRow, bool]:
        async def change(conn: Any) -> str:
            found = await conn.fetchrow(f"{_PACK} FOR UPDATE", req.tenant, pack_id)
            row = build(None if found is None else PackRow(*found))
            await conn.execute(_UPSERT_PACK, *astuple(row))
            # The same response as SQLite's, so that records imported from it replay.
            return json.dumps(asdict(row))

        response, replayed = self._idempotent(req, change)
        return PackRow(**json.loads(response)), replayed

    def put_webhook_endpoint(
        self, endpoint_id: str, req: Request, build: Callable[[WebhookRow | None], WebhookRow]
    ) -> tuple[WebhookRow, bool]:
        async def change(conn: Any) -> str:
            found = await conn.fetchrow(
                f"{_WEBHOOKS} WHERE tenant = $1 AND endpoint_id = $2 FOR UPDATE",
                req.tenant,
                endpoint_id,
            )
            row = build(None if found is None else WebhookRow(*found))
            await conn.execute(_UPSERT_WEBHOOK, *astuple(row))
            return json.dumps(asdict(row))

        response, replayed = self._idempotent(req, change)
        return WebhookRow(**json.loads(response)), replayed

    def delete_webhook_endpoint(self, endpoint_id: str, req: Request) -> tuple[bool, bool]:
        async def change(conn: Any) -> str:
            status = await conn.execute(
                "DELETE FROM config_webhook_endpoints WHERE tenant = $1 AND endpoint_id = $2",
                req.tenant,
                endpoint_id,
            )
            return "1" if _rows_changed(status) else ""

        response, replayed = self._idempotent(req, change)
        return bool(response), replayed

    def webhook_endpoints(self, tenant: str | None = None) -> list[WebhookRow]:
        order = " ORDER BY create_ms, endpoint_id"
        if tenant is None:
            rows = self._call(lambda db: db.fetch(_WEBHOOKS + order))
        else:
            rows = self._call(lambda db: db.fetch(f"{_WEBHOOKS} WHERE tenant = $1{order}", tenant))
        return [WebhookRow(*r) for r in rows]

    def set_webhook_health(
        self, tenant: str, endpoint_id: str, failing_since_ms: int | None, disable_reason: str
    ) -> None:
        async def change(conn: Any) -> tuple[None, bool]:
            status = await conn.execute(
                "UPDATE config_webhook_endpoints SET failing_since_ms = $3,"
                " disabled = disabled OR $4 <> '',"
                " disabled_reason = CASE WHEN $4 <> '' THEN $4 ELSE disabled_reason END"
                " WHERE tenant = $1 AND endpoint_id = $2",
                tenant,
                endpoint_id,
                failing_since_ms,
                disable_reason,
            )
            return None, _rows_changed(status) > 0

        self._write(change)

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


async def _insert_dump(conn: Any, dump: ConfigDump) -> None:
    # Tenants first: keys refer to them. A key whose tenant row is missing (which SQLite
    # without foreign keys on could have) gets one.
    tenants = dict(dump.tenants)
    for k in dump.api_keys:
        tenants.setdefault(k.tenant, k.created_ms)
    await conn.executemany(_INSERT_TENANT, sorted(tenants.items()))
    await conn.executemany(_INSERT_KEY, [astuple(k) for k in dump.api_keys])
    await conn.executemany(_INSERT_RATE, [astuple(r) for r in dump.rates])
    await conn.executemany(_INSERT_PACK, [astuple(p) for p in dump.packs])
    await conn.executemany(_UPSERT_LIMIT, [astuple(r) for r in dump.limits])
    await conn.executemany(_UPSERT_RECHARGE, [astuple(r) for r in dump.recharges])
    await conn.executemany(_UPSERT_WEBHOOK, [astuple(w) for w in dump.webhooks])
    await conn.executemany(_INSERT_REQUEST, dump.requests)


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
