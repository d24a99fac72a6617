"""The ledger's queries and rules, written once for both SQL backends.

`SqlLedger` implements every `Ledger` method over a small connection seam (`Statements`:
fetch, fetchrow, execute, executemany, savepoint) and a `Dialect` (array membership,
period formatting, row locks): the multi-statement rules (purchase completion,
claim_period, stage_grant's conflict handling, the webhook claim and fan-out,
expire_purchases) live here and nowhere else. A backend (`sqlite.py`, `postgres.py`)
opens and pings its connections, runs statements (`_reads`, `_writes`, `_transaction`),
and keeps what is its own and measured: the flusher's `append`.

Every statement is written with `?` markers, in the order of its arguments; the
PostgreSQL backend numbers them (`$1`, `$2`...).

Concurrency (the PostgreSQL ledger is shared by several servers; SQLite has one writer,
and a transaction holds it for all its statements): rows are inserted and locked in key
order so two transactions touching overlapping rows cannot deadlock; rows claimed by
racing workers are locked with SKIP LOCKED so each takes others; where a statement must
see a row a racing transaction committed while it waited, the rule uses a statement of its
own (read committed gives each statement a fresh snapshot).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from creditmeter.errors import Rejected
from creditmeter.storage import sql as common
from creditmeter.storage.ledger.base import (
    COMPANION_KINDS,
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
    notice_row,
    period_notice,
    purchase_from_row,
    purchase_notice,
    purchase_row,
    subscription_from_row,
    subscription_row,
)
from creditmeter.storage.sql import marks

T = TypeVar("T")

#: Events per statement of `scan`.
SCAN_CHUNK = 5000


def _wall_ms() -> int:
    return int(time.time() * 1000)


GRANT_COLUMNS = (
    "tenant, account, request_id, fingerprint, txn, lot_id, amount, priority, expires_at,"
    " source, reference, created_ms, operation"
)
REQUEST_COLUMNS = "tenant, account, request_id, fingerprint, reply, txn, ts_ms"
NOTICE_COLUMNS = "notice_id, tenant, kind, created_ms, data"

#: A staged grant; one already staged under its key stays as it is.
INSERT_GRANT = (
    f"INSERT INTO staged_grants ({GRANT_COLUMNS}) VALUES ({marks(13)})"
    " ON CONFLICT (tenant, account, request_id) DO NOTHING"
)
INSERT_NOTICE = (
    f"INSERT INTO webhook_notices ({NOTICE_COLUMNS}) VALUES ({marks(5)})"
    " ON CONFLICT (notice_id) DO NOTHING"
)
#: Any unique index (request id, payment reference, trial) turns the insert into nothing.
_INSERT_PURCHASE = (
    f"INSERT INTO purchases ({PURCHASE_COLUMNS}) VALUES ({marks(PURCHASE_COLUMN_COUNT)})"
    " ON CONFLICT DO NOTHING"
)
_INSERT_DELIVERY = (
    f"INSERT INTO webhook_deliveries ({DELIVERY_COLUMNS})"
    f" VALUES ({marks(DELIVERY_COLUMN_COUNT)}) ON CONFLICT (delivery_id) DO NOTHING"
)
_SELECT_PURCHASE = f"SELECT {PURCHASE_COLUMNS} FROM purchases"
_SELECT_SUBSCRIPTION = f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions"
_SELECT_DELIVERY = f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries"
_PURCHASE_BY_ID = f"{_SELECT_PURCHASE} WHERE tenant = ? AND purchase_id = ?"
_SUBSCRIPTION_BY_ID = f"{_SELECT_SUBSCRIPTION} WHERE tenant = ? AND subscription_id = ?"
#: Another purchase of the tenant than the one named holding the payment reference.
_REFERENCE_HOLDER = (
    "SELECT purchase_id FROM purchases"
    " WHERE tenant = ? AND payment_reference = ? AND purchase_id <> ? LIMIT 1"
)


class UniqueViolation(Exception):
    """A statement inside a `savepoint` broke a unique index."""


class Statements(common.Statements, Protocol):
    """Where the ledger's statements run: a connection inside a transaction, or (outside
    one) each statement on its own."""

    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """A nested transaction: rolled back alone if its block raises; a unique index
        broken inside it raises UniqueViolation."""
        ...


class Dialect(ABC):
    """What the two SQL dialects spell differently."""

    #: Appended to a SELECT whose rows the transaction goes on to update: "" where a
    #: transaction holds the only writer anyway.
    lock_rows: str = ""
    #: Appended to a SELECT of rows to claim, so racing claims take other rows.
    skip_locked: str = ""

    @abstractmethod
    def any_of(self, column: str, values: Sequence[str]) -> tuple[str, list[Any]]:
        """A condition `column` is one of `values` (text), and its parameters."""

    @abstractmethod
    def period(self, period: Period) -> str:
        """The UTC day or month of `ts_ms` as text (2026-03-01, 2026-03), in byte order."""


def txn_filters(query: TxnQuery) -> tuple[str, list[Any]]:
    """SQL conditions (after tenant and account) and their parameters for a history query."""
    sql: list[str] = []
    params: list[Any] = []
    if query.kinds:
        kinds = list(dict.fromkeys(
            k for kind in query.kinds for k in (kind, *COMPANION_KINDS.get(kind, ()))
        ))  # fmt: skip
        sql.append(f"kind IN ({marks(len(kinds))})")
        params.extend(kinds)
    if query.features:
        sql.append(f"feature IN ({marks(len(query.features))})")
        params.extend(query.features)
    if query.start_ms is not None:
        sql.append("ts_ms >= ?")
        params.append(query.start_ms)
    if query.end_ms is not None:
        sql.append("ts_ms < ?")
        params.append(query.end_ms)
    return "".join(f" AND {s}" for s in sql), params


def listing_filters(
    equal: Sequence[tuple[str, object | None]], id_column: str, before: tuple[int, str] | None
) -> tuple[str, list[Any]]:
    """SQL conditions (after tenant) and their parameters for a listing newest first: each
    column of `equal` whose value is not None equal to it, and the keyset
    `(create_ms, <id_column>) < before`. Purchases and webhook deliveries list this way."""
    sql = [f"{column} = ?" for column, value in equal if value is not None]
    params: list[Any] = [value for _, value in equal if value is not None]
    if before is not None:
        sql.append(f"(create_ms, {id_column}) < (?, ?)")
        params.extend(before)
    return "".join(f" AND {s}" for s in sql), params


async def stage_grants(c: Statements, grants: Sequence[StagedGrant]) -> None:
    """Stage grants inside the caller's transaction; in key order, so two transactions
    staging overlapping grants take their row locks in the same order."""
    rows = sorted((grant_row(g) for g in grants), key=lambda r: r[:3])
    if rows:
        await c.executemany(INSERT_GRANT, rows)


async def _purchase(c: Statements, tenant: str, purchase_id: str) -> PurchaseRecord | None:
    row = await c.fetchrow(_PURCHASE_BY_ID, tenant, purchase_id)
    return None if row is None else purchase_from_row(row)


async def _subscription(
    c: Statements, tenant: str, subscription_id: str
) -> SubscriptionRecord | None:
    row = await c.fetchrow(_SUBSCRIPTION_BY_ID, tenant, subscription_id)
    return None if row is None else subscription_from_row(row)


async def _conflicting_purchase(c: Statements, p: PurchaseRecord) -> PurchaseRecord:
    """The purchase that kept `p` out: same request id, else same payment reference, else
    (for a trial) the same trial. Each is its own statement, so (read committed) each sees
    whatever the racing insert that won committed while ours waited on it."""
    row = await c.fetchrow(
        f"{_SELECT_PURCHASE} WHERE tenant = ? AND request_id = ? LIMIT 1", p.tenant, p.request_id
    )
    if row is None and p.payment_reference:
        row = await c.fetchrow(
            f"{_SELECT_PURCHASE} WHERE tenant = ? AND payment_reference = ? LIMIT 1",
            p.tenant,
            p.payment_reference,
        )
    if row is None and p.trial:
        row = await c.fetchrow(
            f"{_SELECT_PURCHASE} WHERE tenant = ? AND pack_id = ? AND account = ? AND trial"
            " LIMIT 1",
            p.tenant,
            p.pack_id,
            p.account,
        )
    if row is None:  # only the purchase id collided (with another tenant's, or a bug)
        raise RuntimeError(f"purchase id {p.purchase_id!r} is already taken")
    return purchase_from_row(row)


async def _add_notices(c: Statements, notices: Sequence[Notice]) -> None:
    """Webhook notices, in key order (no deadlock between racing transactions)."""
    rows = sorted(notice_row(n) for n in notices)
    if rows:
        await c.executemany(INSERT_NOTICE, rows)


class SqlLedger(Ledger):
    """The ledger over a SQL backend; subclasses provide the connections and the dialect."""

    dialect: Dialect

    #: Where reads outside a transaction run.
    _reads: Statements
    #: Where single-statement writes run, each committed on its own.
    _writes: Statements

    @abstractmethod
    async def _transaction(self, body: Callable[[Statements], Awaitable[T]]) -> T:
        """`body` in one transaction: committed if it returns, rolled back if it raises.
        A backend may run `body` again on a fresh connection when its connection turned
        out dead before it committed, so `body` does nothing but statements."""

    # --- event log --------------------------------------------------------------------
    async def transactions(
        self, tenant: str, account: str, query: TxnQuery, limit: int, before_seq: int | None
    ) -> list[Transaction]:
        where, params = txn_filters(query)
        having = "" if before_seq is None else " HAVING MIN(seq) < ?"
        page = await self._reads.fetch(
            "SELECT txn, MIN(seq) AS first FROM events WHERE tenant = ? AND account = ?"
            f"{where} GROUP BY txn{having} ORDER BY first DESC LIMIT ?",
            tenant, account, *params, *([] if before_seq is None else [before_seq]), limit,
        )  # fmt: skip
        if not page:
            return []
        txns, txn_params = self.dialect.any_of("txn", [r[0] for r in page])
        rows = await self._reads.fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE tenant = ? AND account = ? AND {txns}"
            " ORDER BY seq",
            tenant, account, *txn_params,
        )  # fmt: skip
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
        # SUM(bigint) is numeric in PostgreSQL: back to bigint (an overflow raises, as in
        # SQLite) so the rows hold ints, not Decimals.
        sql = (
            f"SELECT {self.dialect.period(period)} AS period, feature,"
            " CAST(SUM(amount) AS BIGINT), CAST(SUM(units) AS BIGINT) FROM events"
            " WHERE tenant = ? AND kind IN ('consume', 'session') AND ts_ms >= ? AND ts_ms < ?"
        )
        params: list[Any] = [tenant, start_ms, end_ms]
        for column, value in (("account", account), ("feature", feature)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        sql += " GROUP BY period, feature ORDER BY period, feature"
        return [UsageRow(*r) for r in await self._reads.fetch(sql, *params)]

    async def scan(
        self, tenant: str | None = None, account: str | None = None
    ) -> AsyncIterator[Event]:
        scope = [(c, v) for c, v in (("tenant", tenant), ("account", account)) if v is not None]
        # Keyset pagination, one short statement per chunk: no transaction or cursor stays
        # open while the caller works through the events.
        sql = (
            f"SELECT {EVENT_COLUMNS} FROM events"
            " WHERE (tenant, account, seq, event_id) > (?, ?, ?, ?)"
            + "".join(f" AND {c} = ?" for c, _ in scope)
            + " ORDER BY tenant, account, seq, event_id LIMIT ?"
        )
        cursor: tuple[str, str, int, str] = ("", "", -1, "")
        while True:
            rows = await self._reads.fetch(sql, *cursor, *(v for _, v in scope), SCAN_CHUNK)
            for r in rows:
                yield event_from_row(r)
            if len(rows) < SCAN_CHUNK:
                return
            last = rows[-1]  # tenant, account, seq, event_id
            cursor = (last[1], last[2], last[5], last[0])

    async def unbought_recharges(self, since_ms: int, limit: int) -> list[Event]:
        rows = await self._reads.fetch(
            f"SELECT {EVENT_COLUMNS} FROM events AS e"
            " WHERE kind = 'recharge_due' AND reference <> '' AND ts_ms >= ?"
            " AND NOT EXISTS (SELECT 1 FROM purchases AS p WHERE p.tenant = e.tenant"
            " AND p.request_id = 'recharge:' || e.txn) ORDER BY ts_ms LIMIT ?",
            since_ms, limit,
        )  # fmt: skip
        return [event_from_row(r) for r in rows]

    async def requests_since(self, ts_ms: int) -> list[RequestRecord]:
        rows = await self._reads.fetch(
            f"SELECT {REQUEST_COLUMNS} FROM requests WHERE ts_ms >= ?", ts_ms
        )
        return [RequestRecord(*r) for r in rows]

    async def event_count(self) -> int:
        row = await self._reads.fetchrow("SELECT COUNT(*) FROM events")
        assert row is not None
        return int(row[0])

    # --- staging ----------------------------------------------------------------------
    async def stage_grant(self, grant: StagedGrant) -> StagedGrant:
        g = grant
        while True:
            # Two statements, not one: a single statement's snapshot could miss a grant that
            # a concurrent caller committed while this INSERT waited on its row lock.
            if await self._writes.execute(INSERT_GRANT, *grant_row(g)):
                return g
            prior = await self._writes.fetchrow(
                f"SELECT {GRANT_COLUMNS} FROM staged_grants"
                " WHERE tenant = ? AND account = ? AND request_id = ?",
                g.tenant, g.account, g.request_id,
            )  # fmt: skip
            if prior is None:
                continue  # withdrawn in between: stage it afresh
            if prior[3] != g.fingerprint:
                raise Rejected("IDEMPOTENCY_KEY_REUSED", {"request_id": g.request_id})
            return StagedGrant(*prior)

    async def withdraw_grant(self, grant: StagedGrant) -> None:
        await self._writes.execute(
            "DELETE FROM staged_grants"
            " WHERE tenant = ? AND account = ? AND request_id = ? AND txn = ?",
            grant.tenant, grant.account, grant.request_id, grant.txn,
        )  # fmt: skip

    async def unapplied_grants(self, created_before_ms: int, limit: int) -> list[StagedGrant]:
        rows = await self._reads.fetch(
            f"SELECT {GRANT_COLUMNS} FROM staged_grants s"
            " WHERE created_ms < ? AND NOT EXISTS"
            " (SELECT 1 FROM events e WHERE e.event_id = s.txn || ':1')"
            " ORDER BY created_ms LIMIT ?",
            created_before_ms, limit,
        )  # fmt: skip
        return [StagedGrant(*r) for r in rows]

    # --- purchases --------------------------------------------------------------------
    async def create_purchase(
        self, purchase: PurchaseRecord, grants: Sequence[StagedGrant]
    ) -> tuple[PurchaseRecord, bool]:
        p = purchase
        row = purchase_row(p)

        async def create(c: Statements) -> tuple[PurchaseRecord, bool]:
            # A racing insert of the same keys makes this one wait for it to commit (or
            # roll back), then do nothing (or insert).
            if not await c.execute(_INSERT_PURCHASE, *row):
                return await _conflicting_purchase(c, p), False
            await stage_grants(c, grants)
            if p.status in NOTICE_PURCHASE_STATUSES:  # bought in one step (PurchasePack)
                await c.execute(INSERT_NOTICE, *notice_row(purchase_notice(p, p.create_ms)))
            return p, True

        return await self._transaction(create)

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

        async def reference_holder(c: Statements) -> str | None:
            """Another purchase of the tenant that holds the payment reference."""
            if not payment_reference:
                return None
            other = await c.fetchrow(_REFERENCE_HOLDER, tenant, payment_reference, purchase_id)
            return None if other is None else str(other[0])

        def reference_used(other: str | None) -> Rejected:
            return Rejected("PAYMENT_REFERENCE_USED", {"purchase_id": other or ""})

        async def complete(c: Statements) -> PurchaseRecord | None:
            lock = self.dialect.lock_rows
            row = await c.fetchrow(f"{_PURCHASE_BY_ID}{lock}", tenant, purchase_id)
            if row is None:
                return None
            current = purchase_from_row(row)
            if current.status != "pending":
                return current
            if current.expire_ms is not None and current.expire_ms <= now_ms:
                await c.execute(
                    "UPDATE purchases SET status = 'expired' WHERE tenant = ? AND purchase_id = ?",
                    tenant, purchase_id,
                )  # fmt: skip
                expired = replace(current, status="expired")
                await c.execute(INSERT_NOTICE, *notice_row(purchase_notice(expired, now_ms)))
                return expired
            other = await reference_holder(c)
            if other is not None:
                raise reference_used(other)
            try:
                # A savepoint: a racing purchase can still take the reference before this
                # UPDATE reaches the unique index.
                async with c.savepoint():
                    await c.execute(
                        "UPDATE purchases SET status = 'completed', payment_reference = ?,"
                        " lot_ids = ?, complete_ms = ? WHERE tenant = ? AND purchase_id = ?",
                        payment_reference, lots, now_ms, tenant, purchase_id,
                    )  # fmt: skip
            except UniqueViolation:
                # The racing purchase committed (the index waited for it): now visible.
                raise reference_used(await reference_holder(c)) from None
            await stage_grants(c, grants)
            done = await _purchase(c, tenant, purchase_id)
            assert done is not None  # locked (or the only writer) since it was read
            await c.execute(INSERT_NOTICE, *notice_row(purchase_notice(done, now_ms)))
            return done

        return await self._transaction(complete)

    async def update_purchase_status(
        self,
        tenant: str,
        purchase_id: str,
        from_status: str,
        to_status: str,
        refunded_credits: int = 0,
        spent_credits: int = 0,
    ) -> PurchaseRecord | None:
        async def update(c: Statements) -> PurchaseRecord | None:
            updated = await c.execute(
                "UPDATE purchases SET status = ?, refunded_credits = ?, spent_credits = ?"
                " WHERE tenant = ? AND purchase_id = ? AND status = ?",
                to_status, refunded_credits, spent_credits, tenant, purchase_id, from_status,
            )  # fmt: skip
            after = await _purchase(c, tenant, purchase_id)
            if updated and after is not None and to_status in NOTICE_PURCHASE_STATUSES:
                await c.execute(INSERT_NOTICE, *notice_row(purchase_notice(after, _wall_ms())))
            return after

        return await self._transaction(update)

    async def get_purchase(self, tenant: str, purchase_id: str) -> PurchaseRecord | None:
        return await _purchase(self._reads, tenant, purchase_id)

    async def list_purchases(
        self,
        tenant: str,
        account: str | None,
        status: str | None,
        limit: int,
        before: tuple[int, str] | None,
    ) -> list[PurchaseRecord]:
        where, params = listing_filters(
            [("account", account), ("status", status)], "purchase_id", before
        )
        rows = await self._reads.fetch(
            f"{_SELECT_PURCHASE} WHERE tenant = ?{where}"
            " ORDER BY create_ms DESC, purchase_id DESC LIMIT ?",
            tenant, *params, limit,
        )  # fmt: skip
        return [purchase_from_row(r) for r in rows]

    async def expire_purchases(self, now_ms: int, limit: int) -> int:
        async def expire(c: Statements) -> int:
            rows = await c.fetch(
                f"{_SELECT_PURCHASE} WHERE status = 'pending' AND expire_ms <= ? LIMIT ?"
                f"{self.dialect.skip_locked}",
                now_ms, limit,
            )  # fmt: skip
            expired = [replace(purchase_from_row(r), status="expired") for r in rows]
            if expired:
                ids, id_params = self.dialect.any_of(
                    "purchase_id", sorted(p.purchase_id for p in expired)
                )
                await c.execute(
                    f"UPDATE purchases SET status = 'expired' WHERE {ids} AND status = 'pending'",
                    *id_params,
                )
            await _add_notices(c, [purchase_notice(p, now_ms) for p in expired])
            return len(expired)

        return await self._transaction(expire)

    # --- subscriptions ----------------------------------------------------------------
    async def create_subscription(self, sub: SubscriptionRecord) -> tuple[SubscriptionRecord, bool]:
        row = subscription_row(sub)

        async def create(c: Statements) -> tuple[SubscriptionRecord, bool]:
            if await c.execute(
                f"INSERT INTO subscriptions ({SUBSCRIPTION_COLUMNS}) VALUES ({marks(len(row))})"
                " ON CONFLICT DO NOTHING",
                *row,
            ):
                return sub, True
            found = await c.fetchrow(
                f"{_SELECT_SUBSCRIPTION} WHERE tenant = ? AND request_id = ?",
                sub.tenant, sub.request_id,
            )  # fmt: skip
            if found is None:
                raise RuntimeError(f"subscription id {sub.subscription_id!r} is taken")
            return subscription_from_row(found), False

        return await self._transaction(create)

    async def get_subscription(
        self, tenant: str, subscription_id: str
    ) -> SubscriptionRecord | None:
        return await _subscription(self._reads, tenant, subscription_id)

    async def due_subscriptions(self, now_ms: int, limit: int) -> list[SubscriptionRecord]:
        rows = await self._reads.fetch(
            f"{_SELECT_SUBSCRIPTION} WHERE status = 'active' AND next_period_ms <= ?"
            " ORDER BY next_period_ms LIMIT ?",
            now_ms, limit,
        )  # fmt: skip
        return [subscription_from_row(r) for r in rows]

    async def claim_period(
        self,
        tenant: str,
        subscription_id: str,
        period: int,
        next_period_ms: int,
        grants: Sequence[StagedGrant],
    ) -> bool:
        async def claim(c: Statements) -> bool:
            # The row lock of the UPDATE makes racing claims of one period wait for each
            # other; the loser then sees periods_granted moved on and matches nothing.
            if not await c.execute(
                "UPDATE subscriptions SET periods_granted = ?, next_period_ms = ?"
                " WHERE tenant = ? AND subscription_id = ? AND periods_granted = ?"
                " AND status = 'active'",
                period + 1, next_period_ms, tenant, subscription_id, period,
            ):  # fmt: skip
                return False
            await stage_grants(c, grants)
            sub = await _subscription(c, tenant, subscription_id)
            assert sub is not None
            created = grants[0].created_ms if grants else _wall_ms()
            await c.execute(INSERT_NOTICE, *notice_row(period_notice(sub, period, created)))
            return True

        return await self._transaction(claim)

    async def cancel_subscription(
        self, tenant: str, subscription_id: str, now_ms: int
    ) -> SubscriptionRecord | None:
        async def cancel(c: Statements) -> SubscriptionRecord | None:
            await c.execute(
                "UPDATE subscriptions SET status = 'cancelled', cancel_ms = ?"
                " WHERE tenant = ? AND subscription_id = ? AND status = 'active'",
                now_ms, tenant, subscription_id,
            )  # fmt: skip
            return await _subscription(c, tenant, subscription_id)

        return await self._transaction(cancel)

    # --- webhooks ---------------------------------------------------------------------
    async def pending_notices(self, limit: int) -> list[Notice]:
        rows = await self._reads.fetch(
            f"SELECT {NOTICE_COLUMNS} FROM webhook_notices ORDER BY seq LIMIT ?", limit
        )
        return [Notice(*r) for r in rows]

    async def fan_out(self, notice_ids: Sequence[str], deliveries: Sequence[Delivery]) -> None:
        rows = sorted(delivery_row(d) for d in deliveries)  # in key order: no deadlock
        notices, notice_params = self.dialect.any_of("notice_id", sorted(notice_ids))

        async def move(c: Statements) -> None:
            if rows:
                await c.executemany(_INSERT_DELIVERY, rows)
            await c.execute(f"DELETE FROM webhook_notices WHERE {notices}", *notice_params)

        await self._transaction(move)

    async def claim_deliveries(self, now_ms: int, lease_ms: int, limit: int) -> list[Delivery]:
        lease_until_ms = now_ms + lease_ms

        async def claim(c: Statements) -> list[Delivery]:
            # SKIP LOCKED (or SQLite's one writer): racing workers each take other rows
            # rather than wait for each other, or take the same ones.
            rows = await c.fetch(
                f"{_SELECT_DELIVERY} WHERE status = 'pending' AND next_attempt_ms <= ?"
                f" AND lease_until_ms <= ? ORDER BY next_attempt_ms LIMIT ?"
                f"{self.dialect.skip_locked}",
                now_ms, now_ms, limit,
            )  # fmt: skip
            found = [delivery_from_row(r) for r in rows]
            if found:
                ids, id_params = self.dialect.any_of("delivery_id", [d.delivery_id for d in found])
                await c.execute(
                    f"UPDATE webhook_deliveries SET lease_until_ms = ? WHERE {ids}",
                    lease_until_ms, *id_params,
                )  # fmt: skip
            return [replace(d, lease_until_ms=lease_until_ms) for d in found]

        return await self._transaction(claim)

    async def record_attempt(self, delivery: Delivery) -> None:
        d = delivery
        await self._writes.execute(
            "UPDATE webhook_deliveries SET status = ?, attempts = ?, next_attempt_ms = ?,"
            " lease_until_ms = 0, last_attempt_ms = ?, last_status_code = ?, last_error = ?"
            " WHERE delivery_id = ?",
            d.status, d.attempts, d.next_attempt_ms, d.last_attempt_ms, d.last_status_code,
            d.last_error, d.delivery_id,
        )  # fmt: skip

    async def add_delivery(self, delivery: Delivery) -> Delivery:
        async def add(c: Statements) -> Delivery:
            await c.execute(_INSERT_DELIVERY, *delivery_row(delivery))
            row = await c.fetchrow(
                f"{_SELECT_DELIVERY} WHERE delivery_id = ?", delivery.delivery_id
            )
            assert row is not None  # inserted now, or already there
            return delivery_from_row(row)

        return await self._transaction(add)

    async def get_delivery(self, tenant: str, delivery_id: str) -> Delivery | None:
        row = await self._reads.fetchrow(
            f"{_SELECT_DELIVERY} WHERE tenant = ? AND delivery_id = ?", tenant, delivery_id
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
        where, params = listing_filters(
            [("endpoint_id", endpoint_id), ("status", status)], "delivery_id", before
        )
        rows = await self._reads.fetch(
            f"{_SELECT_DELIVERY} WHERE tenant = ?{where}"
            " ORDER BY create_ms DESC, delivery_id DESC LIMIT ?",
            tenant, *params, limit,
        )  # fmt: skip
        return [delivery_from_row(r) for r in rows]

    async def prune_deliveries(self, before_ms: int, limit: int) -> int:
        return await self._writes.execute(
            "DELETE FROM webhook_deliveries WHERE delivery_id IN (SELECT delivery_id"
            " FROM webhook_deliveries WHERE create_ms < ? AND status <> 'pending'"
            f" LIMIT ?{self.dialect.skip_locked})",
            before_ms, limit,
        )  # fmt: skip
