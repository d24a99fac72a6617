"""The SQLite ledger, the default: one file in the data directory, WAL with
synchronous=FULL so a committed batch survives power loss. All database work runs on one
dedicated thread, never on the event loop."""

from __future__ import annotations

import asyncio
import operator
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

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
from creditmeter.storage.ledger.schema import SQLITE_SCHEMA
from creditmeter.storage.migrations import migrate_sqlite

T = TypeVar("T")

_PERIOD_FORMAT = {Period.DAY: "%Y-%m-%d", Period.MONTH: "%Y-%m"}
_SCAN_CHUNK = 5000

_INSERT_GRANT = "INSERT INTO staged_grants VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
#: Any unique index (request id, payment reference, trial) turns the insert into nothing.
_INSERT_PURCHASE = (
    f"INSERT INTO purchases ({PURCHASE_COLUMNS})"
    f" VALUES ({', '.join('?' * PURCHASE_COLUMN_COUNT)}) ON CONFLICT DO NOTHING"
)
_SELECT_PURCHASE = f"SELECT {PURCHASE_COLUMNS} FROM purchases"
_INSERT_EVENTS = (
    f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({', '.join('?' * len(Event._fields))})"
    " ON CONFLICT (event_id) DO NOTHING"
)
_INSERT_REQUESTS = "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
_INSERT_NOTICES = (
    "INSERT INTO webhook_notices (notice_id, tenant, kind, created_ms, data)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (notice_id) DO NOTHING"
)
_INSERT_DELIVERY = (
    f"INSERT INTO webhook_deliveries ({DELIVERY_COLUMNS})"
    f" VALUES ({', '.join('?' * DELIVERY_COLUMN_COUNT)}) ON CONFLICT (delivery_id) DO NOTHING"
)
_SELECT_DELIVERY = f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries"
#: Sort keys of a batch: the tables' primary keys.
_event_key = operator.itemgetter(0)
_request_key = operator.itemgetter(0, 1, 2)


def _in_transaction(db: sqlite3.Connection, fn: Callable[[], T]) -> T:
    """`fn` inside BEGIN IMMEDIATE (the database's write lock, taken up front): committed
    if it returns, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


_SELECT_SUBSCRIPTION = f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions"
#: The writer's page cache (KiB; SQLite's default is 2 MiB). A batch inserts request ids
#: at random places in the requests key: with the default cache the pages it touches are
#: read again for every batch once the ledger is a few hundred MB (10 % of the insert
#: time at 320,000 entries, measured).
WRITER_CACHE_KIB = 64 * 1024
#: How long a write waits for another connection's lock before the ledger counts as down.
BUSY_TIMEOUT_S = 5.0
_UNAVAILABLE = ("locked", "busy", "disk", "I/O", "readonly", "unable to open", "full")


def _subscription(
    db: sqlite3.Connection, tenant: str, subscription_id: str
) -> SubscriptionRecord | None:
    row = db.execute(
        f"{_SELECT_SUBSCRIPTION} WHERE tenant = ? AND subscription_id = ?",
        (tenant, subscription_id),
    ).fetchone()
    return None if row is None else subscription_from_row(row)


def _purchase(db: sqlite3.Connection, tenant: str, purchase_id: str) -> PurchaseRecord | None:
    row = db.execute(
        f"{_SELECT_PURCHASE} WHERE tenant = ? AND purchase_id = ?", (tenant, purchase_id)
    ).fetchone()
    return None if row is None else purchase_from_row(row)


def _first_purchase(db: sqlite3.Connection, where: str, params: Sequence[Any]) -> Any:
    return db.execute(f"{_SELECT_PURCHASE} WHERE {where} LIMIT 1", params).fetchone()


def _conflicting_purchase(db: sqlite3.Connection, p: PurchaseRecord) -> PurchaseRecord:
    """The purchase that kept `p` out: same request id, else same payment reference, else
    (for a trial) the same trial."""
    row = _first_purchase(db, "tenant = ? AND request_id = ?", (p.tenant, p.request_id))
    if row is None and p.payment_reference:
        row = _first_purchase(
            db, "tenant = ? AND payment_reference = ?", (p.tenant, p.payment_reference)
        )
    if row is None and p.trial:
        row = _first_purchase(
            db,
            "tenant = ? AND pack_id = ? AND account = ? AND trial",
            (p.tenant, p.pack_id, p.account),
        )
    if row is None:  # only the purchase id collided (with another tenant's, or a bug)
        raise RuntimeError(f"purchase id {p.purchase_id!r} is already taken")
    return purchase_from_row(row)


def _reference_holder(
    db: sqlite3.Connection, tenant: str, purchase_id: str, reference: str
) -> str | None:
    """Another purchase of the tenant that holds the payment reference."""
    if not reference:
        return None
    row = db.execute(
        "SELECT purchase_id FROM purchases"
        " WHERE tenant = ? AND payment_reference = ? AND purchase_id <> ? LIMIT 1",
        (tenant, reference, purchase_id),
    ).fetchone()
    return None if row is None else str(row[0])


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
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
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


class SqliteLedger(Ledger):
    def __init__(self, path: Path) -> None:
        self.path = path
        # Writes go through one connection on one thread (SQLite has one writer anyway);
        # reads through another, so WAL lets history and reports be read while a write
        # waits for the lock.
        self._writer = _Worker(path, "sqlite-ledger-writer", query_only=False)
        self._reader = _Worker(path, "sqlite-ledger-reader", query_only=True)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._writer.run(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._reader.run(fn)

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

        await self._run(check)

    async def append(
        self,
        events: Sequence[Event],
        requests: Sequence[RequestRecord],
        notices: Sequence[Notice] = (),
    ) -> int:
        # Events and records are their rows. In key order: request ids are random, and
        # inserting them sorted walks the primary key's B-tree once instead of jumping
        # around it.
        rows = sorted(events, key=_event_key)
        reqs = sorted(requests, key=_request_key)

        def write(db: sqlite3.Connection) -> int:
            def insert() -> int:
                before = db.total_changes
                db.executemany(_INSERT_EVENTS, rows)
                inserted = db.total_changes - before
                db.executemany(_INSERT_REQUESTS, reqs)
                if notices:
                    db.executemany(_INSERT_NOTICES, [notice_row(n) for n in notices])
                return inserted

            return _in_transaction(db, insert)

        return await self._run(write)

    async def stage_grant(self, grant: StagedGrant) -> StagedGrant:
        g = grant

        def write(db: sqlite3.Connection) -> StagedGrant:
            db.execute("BEGIN IMMEDIATE")
            try:
                prior = db.execute(
                    "SELECT * FROM staged_grants"
                    " WHERE tenant = ? AND account = ? AND request_id = ?",
                    (g.tenant, g.account, g.request_id),
                ).fetchone()
                if prior is None:
                    db.execute(_INSERT_GRANT, grant_row(g))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if prior is None:
                return g
            if prior[3] != g.fingerprint:
                raise Rejected("IDEMPOTENCY_KEY_REUSED", {"request_id": g.request_id})
            return StagedGrant(*prior)

        return await self._run(write)

    async def withdraw_grant(self, grant: StagedGrant) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM staged_grants WHERE tenant = ? AND account = ? AND request_id = ?"
                " AND txn = ?",
                (grant.tenant, grant.account, grant.request_id, grant.txn),
            )

        await self._run(write)

    async def unapplied_grants(self, created_before_ms: int, limit: int) -> list[StagedGrant]:
        def read(db: sqlite3.Connection) -> list[StagedGrant]:
            rows = db.execute(
                "SELECT * FROM staged_grants s WHERE created_ms < ? AND NOT EXISTS"
                " (SELECT 1 FROM events e WHERE e.event_id = s.txn || ':1')"
                " ORDER BY created_ms LIMIT ?",
                (created_before_ms, limit),
            ).fetchall()
            return [StagedGrant(*r) for r in rows]

        return await self._read(read)

    async def transactions(
        self, tenant: str, account: str, query: TxnQuery, limit: int, before_seq: int | None
    ) -> list[Transaction]:
        where, params = txn_filters(query, lambda: "?")

        def read(db: sqlite3.Connection) -> list[Transaction]:
            having = "" if before_seq is None else " HAVING MIN(seq) < ?"
            page = db.execute(
                "SELECT txn, MIN(seq) AS first FROM events WHERE tenant = ? AND account = ?"
                f"{where} GROUP BY txn{having} ORDER BY first DESC LIMIT ?",
                [tenant, account, *params, *([] if before_seq is None else [before_seq]), limit],
            ).fetchall()
            if not page:
                return []
            txns = [r[0] for r in page]
            rows = db.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE tenant = ? AND account = ?"
                f" AND txn IN ({', '.join('?' * len(txns))}) ORDER BY seq",
                [tenant, account, *txns],
            ).fetchall()
            grouped = group_transactions([event_from_row(r) for r in rows])
            return sorted(grouped, key=lambda t: t.seq, reverse=True)

        return await self._read(read)

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
        sql = (
            f"SELECT strftime('{fmt}', ts_ms / 1000, 'unixepoch') AS period, feature,"
            " SUM(amount), SUM(units) FROM events"
            " WHERE tenant = ? AND kind IN ('consume', 'session') AND ts_ms >= ? AND ts_ms < ?"
        )
        params: list[Any] = [tenant, start_ms, end_ms]
        if account is not None:
            sql += " AND account = ?"
            params.append(account)
        if feature is not None:
            sql += " AND feature = ?"
            params.append(feature)
        sql += " GROUP BY period, feature ORDER BY period, feature"

        def read(db: sqlite3.Connection) -> list[UsageRow]:
            return [UsageRow(*r) for r in db.execute(sql, params).fetchall()]

        return await self._read(read)

    async def scan(
        self, tenant: str | None = None, account: str | None = None
    ) -> AsyncIterator[Event]:
        cursor: tuple[str, str, int, str] = ("", "", -1, "")
        scope = [("tenant", tenant), ("account", account)]
        tenant_sql = "".join(f" AND {col} = ?" for col, value in scope if value is not None)
        scope_params = [value for _, value in scope if value is not None]
        while True:
            params: list[Any] = [*cursor, *scope_params, _SCAN_CHUNK]

            def read(
                db: sqlite3.Connection, sql: str = tenant_sql, p: list[Any] = params
            ) -> list[Any]:
                return db.execute(
                    f"SELECT {EVENT_COLUMNS} FROM events"
                    " WHERE (tenant, account, seq, event_id) > (?, ?, ?, ?)"
                    f"{sql} ORDER BY tenant, account, seq, event_id LIMIT ?",
                    p,
                ).fetchall()

            rows = await self._read(read)
            for r in rows:
                yield event_from_row(r)
            if len(rows) < _SCAN_CHUNK:
                return
            last = rows[-1]
            cursor = (last[1], last[2], last[5], last[0])

    async def unbought_recharges(self, since_ms: int, limit: int) -> list[Event]:
        def read(db: sqlite3.Connection) -> list[Any]:
            return db.execute(
                f"SELECT {EVENT_COLUMNS} FROM events AS e"
                " WHERE kind = 'recharge_due' AND reference <> '' AND ts_ms >= ?"
                " AND NOT EXISTS (SELECT 1 FROM purchases AS p WHERE p.tenant = e.tenant"
                " AND p.request_id = 'recharge:' || e.txn) ORDER BY ts_ms LIMIT ?",
                (since_ms, limit),
            ).fetchall()

        return [event_from_row(r) for r in await self._read(read)]

    async def requests_since(self, ts_ms: int) -> list[RequestRecord]:
        def read(db: sqlite3.Connection) -> list[RequestRecord]:
            rows = db.execute(
                "SELECT tenant, account, request_id, fingerprint, reply, txn, ts_ms"
                " FROM requests WHERE ts_ms >= ?",
                (ts_ms,),
            ).fetchall()
            return [RequestRecord(*r) for r in rows]

        return await self._read(read)

    async def event_count(self) -> int:
        def read(db: sqlite3.Connection) -> int:
            return int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

        return await self._read(read)

    # --- purchases --------------------------------------------------------------------
    async def create_purchase(
        self, purchase: PurchaseRecord, grants: Sequence[StagedGrant]
    ) -> tuple[PurchaseRecord, bool]:
        p = purchase
        row = purchase_row(p)
        grant_rows = [grant_row(g) for g in grants]

        def write(db: sqlite3.Connection) -> tuple[PurchaseRecord, bool]:
            def insert() -> tuple[PurchaseRecord, bool]:
                before = db.total_changes
                db.execute(_INSERT_PURCHASE, row)
                if db.total_changes == before:
                    return _conflicting_purchase(db, p), False
                db.executemany(f"{_INSERT_GRANT} ON CONFLICT DO NOTHING", grant_rows)
                if p.status in NOTICE_PURCHASE_STATUSES:  # bought in one step (PurchasePack)
                    db.execute(_INSERT_NOTICES, notice_row(purchase_notice(p, p.create_ms)))
                return p, True

            return _in_transaction(db, insert)

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
        grant_rows = [grant_row(g) for g in grants]
        key = (tenant, purchase_id)

        def write(db: sqlite3.Connection) -> PurchaseRecord | None:
            def complete() -> PurchaseRecord | None:
                current = _purchase(db, tenant, purchase_id)
                if current is None or current.status != "pending":
                    return current
                if current.expire_ms is not None and current.expire_ms <= now_ms:
                    db.execute(
                        "UPDATE purchases SET status = 'expired'"
                        " WHERE tenant = ? AND purchase_id = ?",
                        key,
                    )
                    after = _purchase(db, tenant, purchase_id)
                    assert after is not None
                    db.execute(_INSERT_NOTICES, notice_row(purchase_notice(after, now_ms)))
                    return after
                other = _reference_holder(db, tenant, purchase_id, payment_reference)
                if other is not None:
                    raise Rejected("PAYMENT_REFERENCE_USED", {"purchase_id": other})
                db.execute(
                    "UPDATE purchases SET status = 'completed', payment_reference = ?,"
                    " lot_ids = ?, complete_ms = ? WHERE tenant = ? AND purchase_id = ?",
                    (payment_reference, lots, now_ms, *key),
                )
                db.executemany(f"{_INSERT_GRANT} ON CONFLICT DO NOTHING", grant_rows)
                done = _purchase(db, tenant, purchase_id)
                assert done is not None
                db.execute(_INSERT_NOTICES, notice_row(purchase_notice(done, now_ms)))
                return done

            return _in_transaction(db, complete)

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
        def write(db: sqlite3.Connection) -> PurchaseRecord | None:
            def update() -> PurchaseRecord | None:
                cur = db.execute(
                    "UPDATE purchases SET status = ?, refunded_credits = ?, spent_credits = ?"
                    " WHERE tenant = ? AND purchase_id = ? AND status = ?",
                    (to_status, refunded_credits, spent_credits, tenant, purchase_id, from_status),
                )
                after = _purchase(db, tenant, purchase_id)
                if cur.rowcount and after is not None and to_status in NOTICE_PURCHASE_STATUSES:
                    db.execute(_INSERT_NOTICES, notice_row(purchase_notice(after, _now_ms())))
                return after

            return _in_transaction(db, update)

        return await self._run(write)

    async def get_purchase(self, tenant: str, purchase_id: str) -> PurchaseRecord | None:
        return await self._read(lambda db: _purchase(db, tenant, purchase_id))

    async def list_purchases(
        self,
        tenant: str,
        account: str | None,
        status: str | None,
        limit: int,
        before: tuple[int, str] | None,
    ) -> list[PurchaseRecord]:
        where, params = listing_filters(
            [("account", account), ("status", status)], "purchase_id", before, lambda: "?"
        )
        sql = (
            f"{_SELECT_PURCHASE} WHERE tenant = ?{where}"
            " ORDER BY create_ms DESC, purchase_id DESC LIMIT ?"
        )

        def read(db: sqlite3.Connection) -> list[PurchaseRecord]:
            rows = db.execute(sql, [tenant, *params, limit]).fetchall()
            return [purchase_from_row(r) for r in rows]

        return await self._read(read)

    # --- subscriptions ------------------------------------------------------------------
    async def create_subscription(self, sub: SubscriptionRecord) -> tuple[SubscriptionRecord, bool]:
        row = subscription_row(sub)

        def write(db: sqlite3.Connection) -> tuple[SubscriptionRecord, bool]:
            def insert() -> tuple[SubscriptionRecord, bool]:
                before = db.total_changes
                db.execute(
                    f"INSERT INTO subscriptions ({SUBSCRIPTION_COLUMNS})"
                    f" VALUES ({', '.join('?' * len(row))}) ON CONFLICT DO NOTHING",
                    row,
                )
                if db.total_changes != before:
                    return sub, True
                found = db.execute(
                    f"{_SELECT_SUBSCRIPTION} WHERE tenant = ? AND request_id = ?",
                    (sub.tenant, sub.request_id),
                ).fetchone()
                if found is None:
                    raise RuntimeError(f"subscription id {sub.subscription_id!r} is taken")
                return subscription_from_row(found), False

            return _in_transaction(db, insert)

        return await self._run(write)

    async def get_subscription(
        self, tenant: str, subscription_id: str
    ) -> SubscriptionRecord | None:
        def read(db: sqlite3.Connection) -> SubscriptionRecord | None:
            return _subscription(db, tenant, subscription_id)

        return await self._read(read)

    async def due_subscriptions(self, now_ms: int, limit: int) -> list[SubscriptionRecord]:
        def read(db: sqlite3.Connection) -> list[SubscriptionRecord]:
            rows = db.execute(
                f"{_SELECT_SUBSCRIPTION} WHERE status = 'active' AND next_period_ms <= ?"
                " ORDER BY next_period_ms LIMIT ?",
                (now_ms, limit),
            ).fetchall()
            return [subscription_from_row(r) for r in rows]

        return await self._read(read)

    async def claim_period(
        self,
        tenant: str,
        subscription_id: str,
        period: int,
        next_period_ms: int,
        grants: Sequence[StagedGrant],
    ) -> bool:
        grant_rows = [grant_row(g) for g in grants]

        def write(db: sqlite3.Connection) -> bool:
            def claim() -> bool:
                before = db.total_changes
                db.execute(
                    "UPDATE subscriptions SET periods_granted = ?, next_period_ms = ?"
                    " WHERE tenant = ? AND subscription_id = ? AND periods_granted = ?"
                    " AND status = 'active'",
                    (period + 1, next_period_ms, tenant, subscription_id, period),
                )
                if db.total_changes == before:
                    return False
                db.executemany(f"{_INSERT_GRANT} ON CONFLICT DO NOTHING", grant_rows)
                sub = _subscription(db, tenant, subscription_id)
                assert sub is not None
                created = grants[0].created_ms if grants else _now_ms()
                db.execute(_INSERT_NOTICES, notice_row(period_notice(sub, period, created)))
                return True

            return _in_transaction(db, claim)

        return await self._run(write)

    async def cancel_subscription(
        self, tenant: str, subscription_id: str, now_ms: int
    ) -> SubscriptionRecord | None:
        def write(db: sqlite3.Connection) -> SubscriptionRecord | None:
            def cancel() -> SubscriptionRecord | None:
                db.execute(
                    "UPDATE subscriptions SET status = 'cancelled', cancel_ms = ?"
                    " WHERE tenant = ? AND subscription_id = ? AND status = 'active'",
                    (now_ms, tenant, subscription_id),
                )
                return _subscription(db, tenant, subscription_id)

            return _in_transaction(db, cancel)

        return await self._run(write)

    # --- webhooks ---------------------------------------------------------------------
    async def pending_notices(self, limit: int) -> list[Notice]:
        def read(db: sqlite3.Connection) -> list[Notice]:
            rows = db.execute(
                "SELECT notice_id, tenant, kind, created_ms, data FROM webhook_notices"
                " ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
            return [Notice(*r) for r in rows]

        return await self._read(read)

    async def fan_out(self, notice_ids: Sequence[str], deliveries: Sequence[Delivery]) -> None:
        rows = [delivery_row(d) for d in deliveries]
        ids = [(i,) for i in notice_ids]

        def write(db: sqlite3.Connection) -> None:
            def move() -> None:
                db.executemany(_INSERT_DELIVERY, rows)
                db.executemany("DELETE FROM webhook_notices WHERE notice_id = ?", ids)

            _in_transaction(db, move)

        await self._run(write)

    async def claim_deliveries(self, now_ms: int, lease_ms: int, limit: int) -> list[Delivery]:
        def write(db: sqlite3.Connection) -> list[Delivery]:
            def claim() -> list[Delivery]:
                # One writer at a time (BEGIN IMMEDIATE): racing claims see each other's.
                rows = db.execute(
                    f"{_SELECT_DELIVERY} WHERE status = 'pending' AND next_attempt_ms <= ?"
                    " AND lease_until_ms <= ? ORDER BY next_attempt_ms LIMIT ?",
                    (now_ms, now_ms, limit),
                ).fetchall()
                found = [delivery_from_row(r) for r in rows]
                db.executemany(
                    "UPDATE webhook_deliveries SET lease_until_ms = ? WHERE delivery_id = ?",
                    [(now_ms + lease_ms, d.delivery_id) for d in found],
                )
                return [replace(d, lease_until_ms=now_ms + lease_ms) for d in found]

            return _in_transaction(db, claim)

        return await self._run(write)

    async def record_attempt(self, delivery: Delivery) -> None:
        d = delivery

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE webhook_deliveries SET status = ?, attempts = ?, next_attempt_ms = ?,"
                " lease_until_ms = 0, last_attempt_ms = ?, last_status_code = ?, last_error = ?"
                " WHERE delivery_id = ?",
                (d.status, d.attempts, d.next_attempt_ms, d.last_attempt_ms, d.last_status_code,
                 d.last_error, d.delivery_id),
            )  # fmt: skip

        await self._run(write)

    async def add_delivery(self, delivery: Delivery) -> Delivery:
        row = delivery_row(delivery)

        def write(db: sqlite3.Connection) -> Delivery:
            def insert() -> Delivery:
                db.execute(_INSERT_DELIVERY, row)
                found = db.execute(
                    f"{_SELECT_DELIVERY} WHERE delivery_id = ?", (delivery.delivery_id,)
                ).fetchone()
                return delivery_from_row(found)

            return _in_transaction(db, insert)

        return await self._run(write)

    async def get_delivery(self, tenant: str, delivery_id: str) -> Delivery | None:
        def read(db: sqlite3.Connection) -> Delivery | None:
            row = db.execute(
                f"{_SELECT_DELIVERY} WHERE tenant = ? AND delivery_id = ?", (tenant, delivery_id)
            ).fetchone()
            return None if row is None else delivery_from_row(row)

        return await self._read(read)

    async def list_deliveries(
        self,
        tenant: str,
        endpoint_id: str | None,
        status: str | None,
        limit: int,
        before: tuple[int, str] | None,
    ) -> list[Delivery]:
        where, params = listing_filters(
            [("endpoint_id", endpoint_id), ("status", status)], "delivery_id", before,
            lambda: "?",
        )
        sql = (
            f"{_SELECT_DELIVERY} WHERE tenant = ?{where}"
            " ORDER BY create_ms DESC, delivery_id DESC LIMIT ?"
        )

        def read(db: sqlite3.Connection) -> list[Delivery]:
            return [delivery_from_row(r) for r in db.execute(sql, [tenant, *params, limit])]

        return await self._read(read)

    async def prune_deliveries(self, before_ms: int, limit: int) -> int:
        def write(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "DELETE FROM webhook_deliveries WHERE delivery_id IN (SELECT delivery_id"
                " FROM webhook_deliveries WHERE create_ms < ? AND status <> 'pending' LIMIT ?)",
                (before_ms, limit),
            )
            return cur.rowcount

        return await self._run(write)

    async def expire_purchases(self, now_ms: int, limit: int) -> int:
        def write(db: sqlite3.Connection) -> int:
            def expire() -> int:
                rows = db.execute(
                    f"{_SELECT_PURCHASE} WHERE status = 'pending' AND expire_ms <= ? LIMIT ?",
                    (now_ms, limit),
                ).fetchall()
                for r in rows:
                    p = replace(purchase_from_row(r), status="expired")
                    db.execute(
                        "UPDATE purchases SET status = 'expired'"
                        " WHERE tenant = ? AND purchase_id = ? AND status = 'pending'",
                        (p.tenant, p.purchase_id),
                    )
                    db.execute(_INSERT_NOTICES, notice_row(purchase_notice(p, now_ms)))
                return len(rows)

            return _in_transaction(db, expire)

        return await self._run(write)


def _now_ms() -> int:
    return int(time.time() * 1000)
