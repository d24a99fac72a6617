"""The config store's queries and rules, written once for both SQL backends.

`SqlConfigStore` implements every `ConfigStore` method over two transactions that a
backend (`sqlite.py`, `postgres.py`) provides, `_read` and `_write`, whose bodies run
statements (`storage/sql.Statements`, `?` markers). What is a backend's own: how it
connects, how a write transaction takes the store's one write lock (SQLite's BEGIN
IMMEDIATE, a lock on PostgreSQL's version row), and its tables' prefix (`config_` in the
ledger's PostgreSQL database, none in SQLite's own file).

Config writes are rare (keys, rates, packs): they are serialized across every server on a
store, so they cannot deadlock and the version moves in commit order. A request record is
claimed by its primary key (`INSERT ... ON CONFLICT DO NOTHING`) before the change runs, so
a request id changes the configuration once however many servers race it.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable, Coroutine
from dataclasses import asdict, astuple
from typing import Any, TypeVar

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
from creditmeter.storage.sql import Row, Statements, marks, upsert

T = TypeVar("T")
#: What a store's transaction runs: a coroutine of statements on the connection it is given.
Body = Callable[[Statements], Coroutine[Any, Any, T]]

KEY_COLUMNS = "key_id, tenant, role, secret_hash, label, created_ms, revoked_ms"
RATE_COLUMNS = "tenant, feature, credits_per_unit, unit, increment_s, updated_ms"
PACK_COLUMNS = (
    "tenant, pack_id, name, description, credits, bonus_credits, price_minor, currency,"
    " validity_days, recurrence, rollover_cap, priority, active, trial, archived, create_ms,"
    " update_ms"
)
REQUEST_COLUMNS = "tenant, request_id, fingerprint, response, created_ms"
LIMIT_COLUMNS = "tenant, feature, period, max_usage, unit, updated_ms"
RECHARGE_COLUMNS = "tenant, threshold, pack_id, updated_ms"
WEBHOOK_COLUMNS = (
    "tenant, endpoint_id, url, event_types, thresholds, description, secret, disabled,"
    " disabled_reason, failing_since_ms, create_ms, update_ms"
)


class Tables:
    """The store's statements over its tables, whose names carry the backend's prefix."""

    def __init__(self, prefix: str) -> None:
        t = {
            name: f"{prefix}{name}"
            for name in (
                "meta", "tenants", "api_keys", "rates", "requests", "packs", "usage_limits",
                "recharge_policies", "webhook_endpoints",
            )
        }  # fmt: skip
        self.names = t
        self.version = f"SELECT value FROM {t['meta']} WHERE name = 'config_version'"
        self.bump = f"UPDATE {t['meta']} SET value = value + 1 WHERE name = 'config_version'"
        self.keys = f"SELECT {KEY_COLUMNS} FROM {t['api_keys']}"
        self.rates = f"SELECT {RATE_COLUMNS} FROM {t['rates']} ORDER BY tenant, feature"
        self.limits = (
            f"SELECT {LIMIT_COLUMNS} FROM {t['usage_limits']} ORDER BY tenant, feature, period"
        )
        self.recharges = f"SELECT {RECHARGE_COLUMNS} FROM {t['recharge_policies']} ORDER BY tenant"
        self.packs = f"SELECT {PACK_COLUMNS} FROM {t['packs']}"
        self.pack = f"{self.packs} WHERE tenant = ? AND pack_id = ?"
        self.webhooks = f"SELECT {WEBHOOK_COLUMNS} FROM {t['webhook_endpoints']}"
        self.webhook = f"{self.webhooks} WHERE tenant = ? AND endpoint_id = ?"

        self.insert_tenant = (
            f"INSERT INTO {t['tenants']} (tenant, created_ms) VALUES (?, ?)"
            " ON CONFLICT DO NOTHING"
        )
        self.insert_key = f"INSERT INTO {t['api_keys']} ({KEY_COLUMNS}) VALUES ({marks(7)})"
        self.insert_rate = f"INSERT INTO {t['rates']} ({RATE_COLUMNS}) VALUES ({marks(6)})"
        self.insert_pack = f"INSERT INTO {t['packs']} ({PACK_COLUMNS}) VALUES ({marks(17)})"
        self.insert_request = (
            f"INSERT INTO {t['requests']} ({REQUEST_COLUMNS}) VALUES ({marks(5)})"
        )
        self.upsert_rate = upsert(t["rates"], RATE_COLUMNS, 2)
        self.upsert_pack = upsert(t["packs"], PACK_COLUMNS, 2)
        self.upsert_limit = upsert(t["usage_limits"], LIMIT_COLUMNS, 3)
        self.upsert_recharge = upsert(t["recharge_policies"], RECHARGE_COLUMNS, 1)
        self.upsert_webhook = upsert(t["webhook_endpoints"], WEBHOOK_COLUMNS, 2)
        #: Claims a request id: nothing when a record holds it (a racing claim waits
        #: here until the other transaction commits or rolls back, then does nothing or
        #: claims).
        self.claim_request = f"{self.insert_request} ON CONFLICT (tenant, request_id) DO NOTHING"

    # --- reads shared by the store and by a dump --------------------------------------
    async def read_version(self, c: Statements) -> int:
        row = await c.fetchrow(self.version)
        assert row is not None  # made by the schema's first migration
        return int(row[0])

    async def read_keys(self, c: Statements, tenant: str | None = None) -> list[KeyRow]:
        rows = await _of_tenant(c, self.keys, tenant, "created_ms, key_id")
        return [KeyRow(*r) for r in rows]

    async def read_rates(self, c: Statements) -> list[RateRow]:
        return [RateRow(*r) for r in await c.fetch(self.rates)]

    async def read_limits(self, c: Statements) -> list[LimitRow]:
        return [LimitRow(*r) for r in await c.fetch(self.limits)]

    async def read_recharges(self, c: Statements) -> list[RechargeRow]:
        return [RechargeRow(*r) for r in await c.fetch(self.recharges)]

    async def read_webhooks(self, c: Statements, tenant: str | None = None) -> list[WebhookRow]:
        rows = await _of_tenant(c, self.webhooks, tenant, "create_ms, endpoint_id")
        return [WebhookRow(*r) for r in rows]

    async def read_snapshot(self, c: Statements) -> ConfigSnapshot:
        return ConfigSnapshot(
            await self.read_version(c),
            await self.read_keys(c),
            await self.read_rates(c),
            await self.read_limits(c),
            await self.read_recharges(c),
        )

    async def insert_dump(self, c: Statements, dump: ConfigDump) -> None:
        """Every row of `dump` into empty tables."""
        # Tenants first: keys refer to them. A key whose tenant row is missing (which
        # SQLite without foreign keys on could have) gets one.
        tenants = dict(dump.tenants)
        for k in dump.api_keys:
            tenants.setdefault(k.tenant, k.created_ms)
        await c.executemany(self.insert_tenant, sorted(tenants.items()))
        await c.executemany(self.insert_key, [astuple(k) for k in dump.api_keys])
        await c.executemany(self.insert_rate, [astuple(r) for r in dump.rates])
        await c.executemany(self.insert_pack, [astuple(p) for p in dump.packs])
        await c.executemany(self.upsert_limit, [astuple(r) for r in dump.limits])
        await c.executemany(self.upsert_recharge, [astuple(r) for r in dump.recharges])
        await c.executemany(self.upsert_webhook, [astuple(w) for w in dump.webhooks])
        await c.executemany(self.insert_request, dump.requests)


async def _of_tenant(c: Statements, select: str, tenant: str | None, order: str) -> list[Row]:
    """The rows of `select` (of one tenant, if given) in `order`."""
    if tenant is None:
        return await c.fetch(f"{select} ORDER BY {order}")
    return await c.fetch(f"{select} WHERE tenant = ? ORDER BY {order}", tenant)


class SqlConfigStore(ConfigStore):
    """The config store over a SQL backend, which provides the transactions."""

    tables: Tables

    @abstractmethod
    def _read(self, body: Body[T], snapshot: bool = False) -> T:
        """`body`'s statements on one connection; with `snapshot`, in one read-only
        transaction, so they see one version's rows."""

    @abstractmethod
    def _write(self, body: Body[T]) -> T:
        """`body` in one write transaction that holds the store's write lock from its
        start: committed if it returns, rolled back if it raises."""

    def _change(self, body: Body[tuple[T, bool]]) -> T:
        """`body` in a write transaction that bumps the version if `body` says (second
        value) it changed anything."""
        bump = self.tables.bump

        async def change(c: Statements) -> T:
            result, changed = await body(c)
            if changed:
                await c.execute(bump)
            return result

        return self._write(change)

    def _idempotent(
        self, req: Request, change: Body[str]
    ) -> tuple[str, bool]:
        """Run `change` once per request id, atomically with the record of its response;
        see `ConfigStore.set_rate`."""
        t = self.tables

        async def claimed(c: Statements) -> tuple[tuple[str, bool], bool]:
            await c.execute(
                f"DELETE FROM {t.names['requests']} WHERE created_ms < ?", req.now_ms - req.ttl_ms
            )
            # The record is claimed first, with an empty response that the same
            # transaction fills in: it is never seen empty.
            if not await c.execute(
                t.claim_request, req.tenant, req.request_id, req.fingerprint, "", req.now_ms
            ):
                prior = await c.fetchrow(
                    f"SELECT fingerprint, response FROM {t.names['requests']}"
                    " WHERE tenant = ? AND request_id = ?",
                    req.tenant, req.request_id,
                )  # fmt: skip
                assert prior is not None  # held by a committed record: claims wait on it
                if prior[0] != req.fingerprint:
                    raise Rejected("IDEMPOTENCY_KEY_REUSED", {"request_id": req.request_id})
                return (str(prior[1]), True), False
            response = await change(c)
            await c.execute(
                f"UPDATE {t.names['requests']} SET response = ?"
                " WHERE tenant = ? AND request_id = ?",
                response, req.tenant, req.request_id,
            )  # fmt: skip
            return (response, False), True

        return self._change(claimed)

    def _put(
        self,
        select: str,
        upsert_sql: str,
        key: tuple[str, str],
        req: Request,
        build: Callable[[T | None], T],
        row_type: Callable[..., T],
    ) -> tuple[T, bool]:
        """Write the row `build` makes of the stored one, once per request id; the
        response is the row as JSON (as 0.1.0's SQLite store made it, so records carried
        over replay)."""

        async def change(c: Statements) -> str:
            found = await c.fetchrow(select, *key)
            row = build(None if found is None else row_type(*found))
            await c.execute(upsert_sql, *astuple(row))  # type: ignore[call-overload]
            return json.dumps(asdict(row))  # type: ignore[call-overload]

        response, replayed = self._idempotent(req, change)
        return row_type(**json.loads(response)), replayed

    # --- reads ------------------------------------------------------------------------
    def version(self) -> int:
        return self._read(self.tables.read_version)

    def snapshot(self) -> ConfigSnapshot:
        return self._read(self.tables.read_snapshot, snapshot=True)

    def api_keys(self, tenant: str | None = None) -> list[KeyRow]:
        return self._read(lambda c: self.tables.read_keys(c, tenant))

    def rates(self) -> list[RateRow]:
        return self._read(self.tables.read_rates)

    def usage_limits(self) -> list[LimitRow]:
        return self._read(self.tables.read_limits)

    def pack(self, tenant: str, pack_id: str) -> PackRow | None:
        async def read(c: Statements) -> PackRow | None:
            row = await c.fetchrow(self.tables.pack, tenant, pack_id)
            return None if row is None else PackRow(*row)

        return self._read(read)

    def packs(
        self, tenant: str, include_inactive: bool, limit: int, after: tuple[int, str] | None
    ) -> list[PackRow]:
        sql = f"{self.tables.packs} WHERE tenant = ?"
        params: list[object] = [tenant]
        if not include_inactive:
            sql += " AND active AND NOT archived"
        if after is not None:
            sql += " AND (create_ms, pack_id) > (?, ?)"
            params.extend(after)
        sql += " ORDER BY create_ms, pack_id LIMIT ?"
        params.append(limit)

        async def read(c: Statements) -> list[PackRow]:
            return [PackRow(*r) for r in await c.fetch(sql, *params)]

        return self._read(read)

    def webhook_endpoints(self, tenant: str | None = None) -> list[WebhookRow]:
        return self._read(lambda c: self.tables.read_webhooks(c, tenant))

    # --- writes -----------------------------------------------------------------------
    def add_key(self, row: KeyRow) -> None:
        async def change(c: Statements) -> tuple[None, bool]:
            await c.execute(self.tables.insert_tenant, row.tenant, row.created_ms)
            await c.execute(self.tables.insert_key, *astuple(row)[:6], None)
            return None, True

        self._change(change)

    def revoke_key(self, key_id: str, now_ms: int) -> bool:
        async def change(c: Statements) -> tuple[bool, bool]:
            revoked = await c.execute(
                f"UPDATE {self.tables.names['api_keys']} SET revoked_ms = ?"
                " WHERE key_id = ? AND revoked_ms IS NULL",
                now_ms, key_id,
            ) == 1  # fmt: skip
            return revoked, revoked

        return self._change(change)

    def set_rate(self, row: RateRow, req: Request) -> tuple[str, bool]:
        async def change(c: Statements) -> str:
            await c.execute(self.tables.upsert_rate, *astuple(row))
            return str(row.updated_ms)

        return self._idempotent(req, change)

    def set_usage_limit(
        self, tenant: str, feature: str, period: str, row: LimitRow | None, req: Request
    ) -> tuple[str, bool]:
        async def change(c: Statements) -> str:
            if row is None:
                await c.execute(
                    f"DELETE FROM {self.tables.names['usage_limits']}"
                    " WHERE tenant = ? AND feature = ? AND period = ?",
                    tenant, feature, period,
                )  # fmt: skip
                return ""
            await c.execute(self.tables.upsert_limit, *astuple(row))
            return str(row.updated_ms)

        return self._idempotent(req, change)

    def set_recharge_policy(
        self, tenant: str, row: RechargeRow | None, req: Request
    ) -> tuple[str, bool]:
        async def change(c: Statements) -> str:
            if row is None:
                await c.execute(
                    f"DELETE FROM {self.tables.names['recharge_policies']} WHERE tenant = ?",
                    tenant,
                )
                return ""
            await c.execute(self.tables.upsert_recharge, *astuple(row))
            return str(row.updated_ms)

        return self._idempotent(req, change)

    def put_pack(
        self, pack_id: str, req: Request, build: Callable[[PackRow | None], PackRow]
    ) -> tuple[PackRow, bool]:
        t = self.tables
        return self._put(t.pack, t.upsert_pack, (req.tenant, pack_id), req, build, PackRow)

    def put_webhook_endpoint(
        self, endpoint_id: str, req: Request, build: Callable[[WebhookRow | None], WebhookRow]
    ) -> tuple[WebhookRow, bool]:
        t = self.tables
        return self._put(
            t.webhook, t.upsert_webhook, (req.tenant, endpoint_id), req, build, WebhookRow
        )

    def delete_webhook_endpoint(self, endpoint_id: str, req: Request) -> tuple[bool, bool]:
        async def change(c: Statements) -> str:
            deleted = await c.execute(
                f"DELETE FROM {self.tables.names['webhook_endpoints']}"
                " WHERE tenant = ? AND endpoint_id = ?",
                req.tenant, endpoint_id,
            )  # fmt: skip
            return "1" if deleted else ""

        response, replayed = self._idempotent(req, change)
        return bool(response), replayed

    def set_webhook_health(
        self, tenant: str, endpoint_id: str, failing_since_ms: int | None, disable_reason: str
    ) -> None:
        async def change(c: Statements) -> tuple[None, bool]:
            updated = await c.execute(
                f"UPDATE {self.tables.names['webhook_endpoints']} SET failing_since_ms = ?,"
                " disabled = (disabled OR ? <> ''),"
                " disabled_reason = CASE WHEN ? <> '' THEN ? ELSE disabled_reason END"
                " WHERE tenant = ? AND endpoint_id = ?",
                failing_since_ms, disable_reason, disable_reason, disable_reason, tenant,
                endpoint_id,
            )  # fmt: skip
            return None, updated > 0

        self._change(change)
