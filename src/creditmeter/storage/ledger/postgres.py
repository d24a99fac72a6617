"""The PostgreSQL ledger (`--ledger-url postgresql://...`), for several servers sharing one
ledger. asyncpg with a connection pool; the same tables and semantics as the SQLite ledger.

Every text column is `COLLATE "C"`: ordering and keyset comparisons then follow byte order,
as in SQLite, whatever the database's default collation is."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from creditmeter.errors import Rejected
from creditmeter.storage.ledger.base import (
    DELIVERY_COLUMN_COUNT,
    DELIVERY_COLUMNS,
    EVENT_COLUMNS,
    NOTICE_PURCHASE_STATUSES,
    PURCHASE_COLUMN_COUNT,
    PURCHASE_COLUMNS,
    SUBSCRIPTION_COLUMNS,
    Delivery,
    Event,
    Ledger,
    Notice,
    Period,
    PurchaseRecord,
    RequestRecord,
    StagedGrant,
    SubscriptionRecord,
    Transaction,
    TxnQuery,
    UsageRow,
    delivery_from_row,
    delivery_row,
    event_from_row,
    grant_row,
    group_transactions,
    join_lot_ids,
    ledger_unavailable,
    listing_filters,
    notice_row,
    period_notice,
    purchase_from_row,
    purchase_notice,
    purchase_row,
    subscription_from_row,
    subscription_row,
    txn_filters,
)
from creditmeter.storage.ledger.schema import POSTGRES_SCHEMA
from creditmeter.storage.migrations import migrate_postgres
from creditmeter.storage.pg import DOWN, close_pool, on_pool

T = TypeVar("T")

#: Serializes the schema's migrations across processes (two servers opening one new
#: database at once); any fixed 64-bit number.
_SCHEMA_LOCK_KEY = 0x63726564_6D657472  # "credmetr"
_POOL_MAX_SIZE = 10
_CONNECT_TIMEOUT_S = 10.0
#: A statement that takes longer fails rather than stalling the flusher forever (a
#: half-open connection to a vanished server never errors on its own).
_COMMAND_TIMEOUT_S = 60.0
_SCAN_CHUNK = 5000
_PERIOD_FORMAT = {Period.DAY: "YYYY-MM-DD", Period.MONTH: "YYYY-MM"}

GRANT_COLUMNS = (
    "tenant, account, request_id, fingerprint, txn, lot_id, amount, priority, expires_at,"
    " source, reference, created_ms, operation"
)
REQUEST_COLUMNS = "tenant, account, request_id, fingerprint, reply, txn, ts_ms"
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


#: A staged grant; one already staged under its key stays as it is.
_INSERT_GRANT = (
    f"INSERT INTO staged_grants ({GRANT_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
    " ON CONFLICT (tenant, account, request_id) DO NOTHING"
)
#: Any unique index (request id, payment reference, trial) turns the insert into nothing.
_INSERT_PURCHASE = (
    f"INSERT INTO purchases ({PURCHASE_COLUMNS})"
    f" VALUES ({', '.join(f'${i}' for i in range(1, PURCHASE_COLUMN_COUNT + 1))})"
    " ON CONFLICT DO NOTHING RETURNING 1"
)
_SELECT_PURCHASE = f"SELECT {PURCHASE_COLUMNS} FROM purchases"
_INSERT_NOTICE = (
    "INSERT INTO webhook_notices (notice_id, tenant, kind, created_ms, data)"
    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (notice_id) DO NOTHING"
)
_INSERT_DELIVERY = (
    f"INSERT INTO webhook_deliveries ({DELIVERY_COLUMNS})"
    f" VALUES ({', '.join(f'${i}' for i in range(1, DELIVERY_COLUMN_COUNT + 1))})"
    " ON CONFLICT (delivery_id) DO NOTHING"
)
_SELECT_DELIVERY = f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries"
_PURCHASE_BY_ID = f"{_SELECT_PURCHASE} WHERE tenant = $1 AND purchase_id = $2"
_SELECT_SUBSCRIPTION = f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions"
_SUBSCRIPTION_BY_ID = f"{_SELECT_SUBSCRIPTION} WHERE tenant = $1 AND subscription_id = $2"
#: Another purchase of the tenant ($1) than $3 holding the payment reference $2.
_REFERENCE_HOLDER = (
    "SELECT purchase_id FROM purchases"
    " WHERE tenant = $1 AND payment_reference = $2 AND purchase_id <> $3 LIMIT 1"
)


async def _stage_grants(conn: Any, grants: Sequence[StagedGrant]) -> None:
    """Stage grants on a connection, inside the caller's transaction; in key order, so two
    transactions staging overlapping grants take their row locks in the same order."""
    rows = sorted((grant_row(g) for g in grants), key=lambda r: r[:3])
    if rows:
        await conn.executemany(_INSERT_GRANT, rows)


async def _conflicting_purchase(conn: Any, p: PurchaseRecord) -> PurchaseRecord:
    """The purchase that kept `p` out: same request id, else same payment reference, else
    (for a trial) the same trial. Each is its own statement, so (read committed) each sees
    whatever the racing insert that won committed while ours waited on it."""
    row = await conn.fetchrow(
        f"{_SELECT_PURCHASE} WHERE tenant = $1 AND request_id = $2", p.tenant, p.request_id
    )
    if row is None and p.payment_reference:
        row = await conn.fetchrow(
            f"{_SELECT_PURCHASE} WHERE tenant = $1 AND payment_reference = $2",
            p.tenant,
            p.payment_reference,
        )
    if row is None and p.trial:
        row = await conn.fetchrow(
            f"{_SELECT_PURCHASE} WHERE tenant = $1 AND pack_id = $2 AND account = $3 AND trial",
            p.tenant,
            p.pack_id,
            p.account,
        )
    if row is None:  # only the purchase id collided (with another tenant's, or a bug)
        raise RuntimeError(f"purchase id {p.purchase_id!r} is already taken")
    return purchase_from_row(row)


def _rows_inserted(status: str) -> int:
    """The row count of an INSERT's command tag, "INSERT 0 <rows>"."""
    return int(status.rsplit(" ", 1)[1])


class PostgresLedger(Ledger):
    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None

    async def _run(self, op: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
        """`op` on the pool; once more if a pooled connection turns out dead (the server
        restarted or failed over since it was last used). Safe: every ledger operation is
        idempotent (though if the connection died after a COMMIT went out, the retried
        append counts those events as already present)."""
        pool = self._pool
        if pool is None:
            raise ledger_unavailable()  # not open yet (the ledger did not answer) or closed
        return await on_pool(pool, op)

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
                    inserted = _rows_inserted(await conn.execute(_INSERT_EVENTS))
                if requests:
                    await conn.copy_records_to_table(_REQUESTS_STAGING, records=requests)
                    await conn.execute(_INSERT_REQUESTS)
                if notices:
                    await conn.executemany(
                        _INSERT_NOTICE, sorted(notice_row(n) for n in notices)
                    )
            return inserted

        return await self._run(write)

    async def stage_grant(self, grant: StagedGrant) -> StagedGrant:
        g = grant
        while True:
            # Two statements, not one: a single statement's snapshot could miss a grant that
            # a concurrent caller committed while this INSERT waited on its row lock.
            added = await self._run(
                lambda db: db.fetchrow(f"{_INSERT_GRANT} RETURNING 1", *grant_row(g))
            )
            if added is not None:
                return g
            prior = await self._run(
                lambda db: db.fetchrow(
                    f"SELECT {GRANT_COLUMNS} FROM staged_grants"
                    " WHERE tenant = $1 AND account = $2 AND request_id = $3",
                    g.tenant,
                    g.account,
                    g.request_id,
                )
            )
            if prior is None:
                continue  # withdrawn in between: stage it afresh
            if prior["fingerprint"] != g.fingerprint:
                raise Rejected("IDEMPOTENCY_KEY_REUSED", {"request_id": g.request_id})
            return StagedGrant(*prior)

    async def withdraw_grant(self, grant: StagedGrant) -> None:
        await self._run(
            lambda db: db.execute(
                "DELETE FROM staged_grants"
                " WHERE tenant = $1 AND account = $2 AND request_id = $3 AND txn = $4",
                grant.tenant,
                grant.account,
                grant.request_id,
                grant.txn,
            )
        )

    async def unapplied_grants(self, created_before_ms: int, limit: int) -> list[StagedGrant]:
        rows = await self._run(
            lambda db: db.fetch(
                f"SELECT {GRANT_COLUMNS} FROM staged_grants s"
                " WHERE created_ms < $1 AND NOT EXISTS"
                " (SELECT 1 FROM events e WHERE e.event_id = s.txn || ':1')"
                " ORDER BY created_ms LIMIT $2",
                created_before_ms,
                limit,
            )
        )
        return [StagedGrant(*r) for r in rows]

    async def transactions(
        self, tenant: str, account: str, query: TxnQuery, limit: int, before_seq: int | None
    ) -> list[Transaction]:
        numbers = itertools.count(3)  # $1 and $2 are tenant and account
        where, params = txn_filters(query, lambda: f"${next(numbers)}")
        args: list[Any] = [tenant, account, *params]
        having = ""
        if before_seq is not None:
            args.append(before_seq)
            having = f" HAVING MIN(seq) < ${len(args)}"
        args.append(limit)
        page_sql = (
            "SELECT txn, MIN(seq) AS first FROM events WHERE tenant = $1 AND account = $2"
            f"{where} GROUP BY txn{having} ORDER BY first DESC LIMIT ${len(args)}"
        )
        page = await self._run(lambda db: db.fetch(page_sql, *args))
        if not page:
            return []
        txns = [r["txn"] for r in page]
        rows = await self._run(
            lambda db: db.fetch(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE tenant = $1 AND account = $2"
                " AND txn = ANY($3::text[]) ORDER BY seq",
                tenant,
                account,
                txns,
            )
        )
        grouped = group_transactions([event_from_row(r) for r in rows])
        return sorted(grouped, key=lambda t: t.seq, reverse=True)

    async def usage(
        self,
        tenant: str,
        account: str | None,
        start_ms: int,
        end_ms: int,
        period: Period,
        feature: str | None,
    ) -> list[UsageRow]:
        fmt = _PERIOD_FORMAT[period]
        # SUM(bigint) is numeric in PostgreSQL: back to bigint (an overflow raises, as in
        # SQLite) so the rows hold ints, not Decimals.
        sql = (
            f"SELECT to_char(to_timestamp(ts_ms / 1000.0) AT TIME ZONE 'UTC', '{fmt}')"
            ' COLLATE "C" AS period, feature, SUM(amount)::bigint, SUM(units)::bigint'
            " FROM events WHERE tenant = $1 AND kind IN ('consume', 'session')"
            " AND ts_ms >= $2 AND ts_ms < $3"
        )
        params: list[Any] = [tenant, start_ms, end_ms]
        if account is not None:
            params.append(account)
            sql += f" AND account = ${len(params)}"
        if feature is not None:
            params.append(feature)
            sql += f" AND feature = ${len(params)}"
        sql += " GROUP BY period, feature ORDER BY period, feature"
        return [UsageRow(*r) for r in await self._run(lambda db: db.fetch(sql, *params))]

    async def scan(
        self, tenant: str | None = None, account: str | None = None
    ) -> AsyncIterator[Event]:
        scope = [(c, v) for c, v in (("tenant", tenant), ("account", account)) if v is not None]
        # Keyset pagination, one short statement per chunk: no transaction or cursor stays
        # open while the caller works through the events.
        sql = (
            f"SELECT {EVENT_COLUMNS} FROM events"
            " WHERE (tenant, account, seq, event_id) > ($1, $2, $3, $4)"
            + "".join(f" AND {c} = ${i}" for i, (c, _) in enumerate(scope, 6))
            + " ORDER BY tenant, account, seq, event_id LIMIT $5"
        )
        cursor: tuple[str, str, int, str] = ("", "", -1, "")
        while True:
            args = [*cursor, _SCAN_CHUNK, *(v for _, v in scope)]

            async def chunk(db: asyncpg.Pool, a: list[Any] = args) -> list[Any]:
                return list(await db.fetch(sql, *a))

            rows = await self._run(chunk)
            for r in rows:
                yield event_from_row(r)
            if len(rows) < _SCAN_CHUNK:
                return
            last = rows[-1]
            cursor = (last["tenant"], last["account"], last["seq"], last["event_id"])

    async def unbought_recharges(self, since_ms: int, limit: int) -> list[Event]:
        rows = await self._run(
            lambda db: db.fetch(
                f"SELECT {EVENT_COLUMNS} FROM events AS e"
                " WHERE kind = 'recharge_due' AND reference <> '' AND ts_ms >= $1"
                " AND NOT EXISTS (SELECT 1 FROM purchases AS p WHERE p.tenant = e.tenant"
                " AND p.request_id = 'recharge:' || e.txn) ORDER BY ts_ms LIMIT $2",
                since_ms, limit,
            )
        )  # fmt: skip
        return [event_from_row(r) for r in rows]

    async def requests_since(self, ts_ms: int) -> list[RequestRecord]:
        rows = await self._run(
            lambda db: db.fetch(f"SELECT {REQUEST_COLUMNS} FROM requests WHERE ts_ms >= $1", ts_ms)
        )
        return [RequestRecord(*r) for r in rows]

    async def event_count(self) -> int:
        return int(await self._run(lambda db: db.fetchval("SELECT COUNT(*) FROM events")))

    # --- purchases --------------------------------------------------------------------
    async def create_purchase(
        self, purchase: PurchaseRecord, grants: Sequence[StagedGrant]
    ) -> tuple[PurchaseRecord, bool]:
        p = purchase
        row = purchase_row(p)

        async def write(db: asyncpg.Pool) -> tuple[PurchaseRecord, bool]:
            async with db.acquire() as conn, conn.transaction():
                # A racing insert of the same keys makes this one wait for it to commit (or
                # roll back), then do nothing (or insert).
                if await conn.fetchval(_INSERT_PURCHASE, *row) is None:
                    return await _conflicting_purchase(conn, p), False
                await _stage_grants(conn, grants)
                if p.status in NOTICE_PURCHASE_STATUSES:  # bought in one step (PurchasePack)
                    await conn.execute(_INSERT_NOTICE, *notice_row(purchase_notice(p, p.create_ms)))
                return p, True

        return await self._run(write)

    async def complete_purchase(
        self,
        tenant: str,
        purchase_id: str,
        payment_reference: str,
        lot_ids: tuple[str, ...],
        now_ms: int,
        grants: Sequence[StagedGrant],
    ) -> PurchaseRecord | None:
        lots = join_lot_ids(lot_ids)

        async def reference_holder(conn: Any) -> str | None:
            """Another purchase of the tenant that holds the payment reference."""
            if not payment_reference:
                return None
            other = await conn.fetchval(_REFERENCE_HOLDER, tenant, payment_reference, purchase_id)
            return None if other is None else str(other)

        def reference_used(other: str | None) -> Rejected:
            return Rejected("PAYMENT_REFERENCE_USED", {"purchase_id": other or ""})

        async def write(db: asyncpg.Pool) -> PurchaseRecord | None:
            async with db.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(f"{_PURCHASE_BY_ID} FOR UPDATE", tenant, purchase_id)
                if row is None:
                    return None
                current = purchase_from_row(row)
                if current.status != "pending":
                    return current
                if current.expire_ms is not None and current.expire_ms <= now_ms:
                    row = await conn.fetchrow(
                        "UPDATE purchases SET status = 'expired'"
                        f" WHERE tenant = $1 AND purchase_id = $2 RETURNING {PURCHASE_COLUMNS}",
                        tenant,
                        purchase_id,
                    )
                    expired = purchase_from_row(row)
                    notice = purchase_notice(expired, now_ms)
                    await conn.execute(_INSERT_NOTICE, *notice_row(notice))
                    return expired
                other = await reference_holder(conn)
                if other is not None:
                    raise reference_used(other)
                try:
                    # A savepoint: a racing purchase can still take the reference before
                    # this UPDATE reaches the unique index.
                    async with conn.transaction():
                        row = await conn.fetchrow(
                            "UPDATE purchases SET status = 'completed', payment_reference = $3,"
                            " lot_ids = $4, complete_ms = $5 WHERE tenant = $1"
                            f" AND purchase_id = $2 RETURNING {PURCHASE_COLUMNS}",
                            tenant,
                            purchase_id,
                            payment_reference,
                            lots,
                            now_ms,
                        )
                except asyncpg.UniqueViolationError:
                    # The racing purchase committed (the index waited for it): now visible.
                    raise reference_used(await reference_holder(conn)) from None
                await _stage_grants(conn, grants)
                done = purchase_from_row(row)
                await conn.execute(_INSERT_NOTICE, *notice_row(purchase_notice(done, now_ms)))
                return done

        return await self._run(write)

    async def update_purchase_status(
        self,
        tenant: str,
        purchase_id: str,
        from_status: str,
        to_status: str,
        refunded_credits: int = 0,
        spent_credits: int = 0,
    ) -> PurchaseRecord | None:
        async def write(db: asyncpg.Pool) -> PurchaseRecord | None:
            async with db.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "UPDATE purchases SET status = $4, refunded_credits = $5, spent_credits = $6"
                    " WHERE tenant = $1 AND purchase_id = $2 AND status = $3"
                    f" RETURNING {PURCHASE_COLUMNS}",
                    tenant,
                    purchase_id,
                    from_status,
                    to_status,
                    refunded_credits,
                    spent_credits,
                )
                if row is None:
                    row = await conn.fetchrow(_PURCHASE_BY_ID, tenant, purchase_id)
                elif to_status in NOTICE_PURCHASE_STATUSES:
                    notice = purchase_notice(purchase_from_row(row), _now_ms())
                    await conn.execute(_INSERT_NOTICE, *notice_row(notice))
            return None if row is None else purchase_from_row(row)

        return await self._run(write)

    async def get_purchase(self, tenant: str, purchase_id: str) -> PurchaseRecord | None:
        row = await self._run(lambda db: db.fetchrow(_PURCHASE_BY_ID, tenant, purchase_id))
        return None if row is None else purchase_from_row(row)

    async def list_purchases(
        self,
        tenant: str,
        account: str | None,
        status: str | None,
        limit: int,
        before: tuple[int, str] | None,
    ) -> list[PurchaseRecord]:
        numbers = itertools.count(2)  # $1 is the tenant
        where, params = listing_filters(
            [("account", account), ("status", status)], "purchase_id", before,
            lambda: f"${next(numbers)}",
        )
        args: list[Any] = [tenant, *params, limit]
        sql = (
            f"{_SELECT_PURCHASE} WHERE tenant = $1{where}"
            f" ORDER BY create_ms DESC, purchase_id DESC LIMIT ${len(args)}"
        )
        rows = await self._run(lambda db: db.fetch(sql, *args))
        return [purchase_from_row(r) for r in rows]

    # --- subscriptions ------------------------------------------------------------------
    async def create_subscription(self, sub: SubscriptionRecord) -> tuple[SubscriptionRecord, bool]:
        row = subscription_row(sub)
        marks = ", ".join(f"${i}" for i in range(1, len(row) + 1))

        async def write(db: asyncpg.Pool) -> tuple[SubscriptionRecord, bool]:
            async with db.acquire() as conn, conn.transaction():
                inserted = await conn.fetchval(
                    f"INSERT INTO subscriptions ({SUBSCRIPTION_COLUMNS}) VALUES ({marks})"
                    " ON CONFLICT DO NOTHING RETURNING 1",
                    *row,
                )
                if inserted is not None:
                    return sub, True
                found = await conn.fetchrow(
                    f"{_SELECT_SUBSCRIPTION} WHERE tenant = $1 AND request_id = $2",
                    sub.tenant,
                    sub.request_id,
                )
                if found is None:
                    raise RuntimeError(f"subscription id {sub.subscription_id!r} is taken")
                return subscription_from_row(found), False

        return await self._run(write)

    async def get_subscription(
        self, tenant: str, subscription_id: str
    ) -> SubscriptionRecord | None:
        row = await self._run(lambda db: db.fetchrow(_SUBSCRIPTION_BY_ID, tenant, subscription_id))
        return None if row is None else subscription_from_row(row)

    async def due_subscriptions(self, now_ms: int, limit: int) -> list[SubscriptionRecord]:
        rows = await self._run(
            lambda db: db.fetch(
                f"{_SELECT_SUBSCRIPTION} WHERE status = 'active' AND next_period_ms <= $1"
                " ORDER BY next_period_ms LIMIT $2",
                now_ms,
                limit,
            )
        )
        return [subscription_from_row(r) for r in rows]

    async def claim_period(
        self,
        tenant: str,
        subscription_id: str,
        period: int,
        next_period_ms: int,
        grants: Sequence[StagedGrant],
    ) -> bool:
        async def write(db: asyncpg.Pool) -> bool:
            async with db.acquire() as conn, conn.transaction():
                # The row lock of the UPDATE makes racing claims of one period wait for
                # each other; the loser then sees periods_granted moved on and matches nothing.
                claimed = await conn.fetchval(
                    "UPDATE subscriptions SET periods_granted = $1, next_period_ms = $2"
                    " WHERE tenant = $3 AND subscription_id = $4 AND periods_granted = $5"
                    " AND status = 'active' RETURNING 1",
                    period + 1,
                    next_period_ms,
                    tenant,
                    subscription_id,
                    period,
                )
                if claimed is None:
                    return False
                await _stage_grants(conn, grants)
                sub = subscription_from_row(
                    await conn.fetchrow(_SUBSCRIPTION_BY_ID, tenant, subscription_id)
                )
                created = grants[0].created_ms if grants else _now_ms()
                await conn.execute(_INSERT_NOTICE, *notice_row(period_notice(sub, period, created)))
                return True

        return await self._run(write)

    async def cancel_subscription(
        self, tenant: str, subscription_id: str, now_ms: int
    ) -> SubscriptionRecord | None:
        async def write(db: asyncpg.Pool) -> SubscriptionRecord | None:
            async with db.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE subscriptions SET status = 'cancelled', cancel_ms = $1"
                    " WHERE tenant = $2 AND subscription_id = $3 AND status = 'active'",
                    now_ms,
                    tenant,
                    subscription_id,
                )
                row = await conn.fetchrow(_SUBSCRIPTION_BY_ID, tenant, subscription_id)
                return None if row is None else subscription_from_row(row)

        return await self._run(write)

    # --- webhooks ---------------------------------------------------------------------
    async def pending_notices(self, limit: int) -> list[Notice]:
        rows = await self._run(
            lambda db: db.fetch(
                "SELECT notice_id, tenant, kind, created_ms, data FROM webhook_notices"
                " ORDER BY seq LIMIT $1",
                limit,
            )
        )
        return [Notice(*r) for r in rows]

    async def fan_out(self, notice_ids: Sequence[str], deliveries: Sequence[Delivery]) -> None:
        rows = sorted(delivery_row(d) for d in deliveries)  # in key order: no deadlock

        async def write(db: asyncpg.Pool) -> None:
            async with db.acquire() as conn, conn.transaction():
                if rows:
                    await conn.executemany(_INSERT_DELIVERY, rows)
                await conn.execute(
                    "DELETE FROM webhook_notices WHERE notice_id = ANY($1::text[])",
                    sorted(notice_ids),
                )

        await self._run(write)

    async def claim_deliveries(self, now_ms: int, lease_ms: int, limit: int) -> list[Delivery]:
        # SKIP LOCKED: racing workers each take other rows rather than wait for each other.
        rows = await self._run(
            lambda db: db.fetch(
                "UPDATE webhook_deliveries SET lease_until_ms = $2 WHERE delivery_id IN"
                " (SELECT delivery_id FROM webhook_deliveries WHERE status = 'pending'"
                " AND next_attempt_ms <= $1 AND lease_until_ms <= $1 ORDER BY next_attempt_ms"
                f" LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING {DELIVERY_COLUMNS}",
                now_ms,
                now_ms + lease_ms,
                limit,
            )
        )
        return sorted((delivery_from_row(r) for r in rows), key=lambda d: d.next_attempt_ms)

    async def record_attempt(self, delivery: Delivery) -> None:
        d = delivery
        args = (
            d.delivery_id, d.status, d.attempts, d.next_attempt_ms, d.last_attempt_ms,
            d.last_status_code, d.last_error,
        )  # fmt: skip
        await self._run(
            lambda db: db.execute(
                "UPDATE webhook_deliveries SET status = $2, attempts = $3, next_attempt_ms = $4,"
                " lease_until_ms = 0, last_attempt_ms = $5, last_status_code = $6,"
                " last_error = $7 WHERE delivery_id = $1",
                *args,
            )
        )

    async def add_delivery(self, delivery: Delivery) -> Delivery:
        async def write(db: asyncpg.Pool) -> Delivery:
            async with db.acquire() as conn, conn.transaction():
                await conn.execute(_INSERT_DELIVERY, *delivery_row(delivery))
                row = await conn.fetchrow(
                    f"{_SELECT_DELIVERY} WHERE delivery_id = $1", delivery.delivery_id
                )
                return delivery_from_row(row)

        return await self._run(write)

    async def get_delivery(self, tenant: str, delivery_id: str) -> Delivery | None:
        row = await self._run(
            lambda db: db.fetchrow(
                f"{_SELECT_DELIVERY} WHERE tenant = $1 AND delivery_id = $2", tenant, delivery_id
            )
        )
        return None if row is None else delivery_from_row(row)

    async def list_deliveries(
        self,
        tenant: str,
        endpoint_id: str | None,
        status: str | None,
        limit: int,
        before: tuple[int, str] | None,
    ) -> list[Delivery]:
        counter = itertools.count(2)
        where, params = listing_filters(
            [("endpoint_id", endpoint_id), ("status", status)], "delivery_id", before,
            lambda: f"${next(counter)}",
        )
        sql = (
            f"{_SELECT_DELIVERY} WHERE tenant = $1{where}"
            f" ORDER BY create_ms DESC, delivery_id DESC LIMIT ${next(counter)}"
        )
        rows = await self._run(lambda db: db.fetch(sql, tenant, *params, limit))
        return [delivery_from_row(r) for r in rows]

    async def prune_deliveries(self, before_ms: int, limit: int) -> int:
        status = await self._run(
            lambda db: db.execute(
                "DELETE FROM webhook_deliveries WHERE delivery_id IN (SELECT delivery_id"
                " FROM webhook_deliveries WHERE create_ms < $1 AND status <> 'pending'"
                " LIMIT $2 FOR UPDATE SKIP LOCKED)",
                before_ms,
                limit,
            )
        )
        return _rows_inserted(status)

    async def expire_purchases(self, now_ms: int, limit: int) -> int:
        async def write(db: asyncpg.Pool) -> int:
            async with db.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    "UPDATE purchases SET status = 'expired' WHERE purchase_id IN"
                    " (SELECT purchase_id FROM purchases WHERE status = 'pending'"
                    " AND expire_ms <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)"
                    f" RETURNING {PURCHASE_COLUMNS}",
                    now_ms,
                    limit,
                )
                notices = sorted(
                    notice_row(purchase_notice(purchase_from_row(r), now_ms)) for r in rows
                )
                if notices:
                    await conn.executemany(_INSERT_NOTICE, notices)
                return len(rows)

        return await self._run(write)


def _now_ms() -> int:
    return int(time.time() * 1000)
