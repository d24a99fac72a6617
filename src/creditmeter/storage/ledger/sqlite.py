"""The SQLite ledger, the default: one file in the data directory, WAL with
synchronous=FULL so a committed batch survives power loss. All database work runs on one
dedicated thread, never on the event loop."""

from __future__ import annotations

import asyncio
import operator
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from creditmeter.errors import Rejected
from creditmeter.storage.ledger.base import (
    EVENT_COLUMNS,
    PURCHASE_COLUMN_COUNT,
    PURCHASE_COLUMNS,
    SUBSCRIPTION_COLUMNS,
    Event,
    Ledger,
    Period,
    PurchaseRecord,
    RequestRecord,
    StagedGrant,
    SubscriptionRecord,
    Transaction,
    TxnQuery,
    UsageRow,
    event_from_row,
    grant_row,
    group_transactions,
    join_lot_ids,
    ledger_unavailable,
    purchase_filters,
    purchase_from_row,
    purchase_row,
    subscription_from_row,
    subscription_row,
    txn_filters,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
  event_id   TEXT PRIMARY KEY,
  tenant     TEXT NOT NULL,
  account    TEXT NOT NULL,
  kind       TEXT NOT NULL,
  txn        TEXT NOT NULL,
  seq        INTEGER NOT NULL,
  request_id TEXT NOT NULL,
  ts_ms      INTEGER NOT NULL,
  lot        TEXT NOT NULL,
  amount     INTEGER NOT NULL,
  balance    INTEGER,
  feature    TEXT NOT NULL,
  units      INTEGER NOT NULL,
  priority   INTEGER,
  expires_at INTEGER,
  source     TEXT NOT NULL,
  reference  TEXT NOT NULL,
  unlimited  INTEGER
);
CREATE INDEX IF NOT EXISTS events_account_seq ON events (tenant, account, seq);
CREATE INDEX IF NOT EXISTS events_tenant_time ON events (tenant, kind, ts_ms);
CREATE INDEX IF NOT EXISTS events_recharge_due ON events (ts_ms)
  WHERE kind = 'recharge_due';
CREATE TABLE IF NOT EXISTS requests (
  tenant      TEXT NOT NULL,
  account     TEXT NOT NULL,
  request_id  TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  reply       TEXT NOT NULL,
  txn         TEXT NOT NULL,
  ts_ms       INTEGER NOT NULL,
  PRIMARY KEY (tenant, account, request_id)
);
CREATE INDEX IF NOT EXISTS requests_time ON requests (ts_ms);
CREATE TABLE IF NOT EXISTS staged_grants (
  tenant      TEXT NOT NULL,
  account     TEXT NOT NULL,
  request_id  TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  txn         TEXT NOT NULL,
  lot_id      TEXT NOT NULL,
  amount      INTEGER NOT NULL,
  priority    INTEGER NOT NULL,
  expires_at  INTEGER,
  source      TEXT NOT NULL,
  reference   TEXT NOT NULL,
  created_ms  INTEGER NOT NULL,
  operation   TEXT NOT NULL,
  PRIMARY KEY (tenant, account, request_id)
);
CREATE INDEX IF NOT EXISTS staged_grants_created ON staged_grants (created_ms);
CREATE TABLE IF NOT EXISTS subscriptions (
  subscription_id TEXT PRIMARY KEY,
  tenant          TEXT NOT NULL,
  account         TEXT NOT NULL,
  pack_id         TEXT NOT NULL,
  status          TEXT NOT NULL,
  recurrence      TEXT NOT NULL,
  pack_name       TEXT NOT NULL,
  credits         INTEGER NOT NULL,
  bonus_credits   INTEGER NOT NULL,
  rollover_cap    INTEGER NOT NULL,
  priority        INTEGER NOT NULL,
  price_minor     INTEGER NOT NULL,
  currency        TEXT NOT NULL,
  anchor_ms       INTEGER NOT NULL,
  periods_granted INTEGER NOT NULL,
  next_period_ms  INTEGER NOT NULL,
  request_id      TEXT NOT NULL,
  fingerprint     TEXT NOT NULL,
  create_ms       INTEGER NOT NULL,
  cancel_ms       INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS subscriptions_request ON subscriptions (tenant, request_id);
CREATE INDEX IF NOT EXISTS subscriptions_due ON subscriptions (status, next_period_ms);
CREATE TABLE IF NOT EXISTS purchases (
  purchase_id       TEXT PRIMARY KEY,
  tenant            TEXT NOT NULL,
  account           TEXT NOT NULL,
  pack_id           TEXT NOT NULL,
  status            TEXT NOT NULL,
  payment_reference TEXT NOT NULL,
  pack_name         TEXT NOT NULL,
  price_minor       INTEGER NOT NULL,
  currency          TEXT NOT NULL,
  credits           INTEGER NOT NULL,
  bonus_credits     INTEGER NOT NULL,
  lot_ids           TEXT NOT NULL,
  request_id        TEXT NOT NULL,
  fingerprint       TEXT NOT NULL,
  trial             INTEGER NOT NULL,
  create_ms         INTEGER NOT NULL,
  complete_ms       INTEGER,
  expire_ms         INTEGER,
  refunded_credits  INTEGER NOT NULL,
  spent_credits     INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS purchases_request ON purchases (tenant, request_id);
CREATE UNIQUE INDEX IF NOT EXISTS purchases_payment_reference
  ON purchases (tenant, payment_reference) WHERE payment_reference <> '';
CREATE UNIQUE INDEX IF NOT EXISTS purchases_trial ON purchases (tenant, pack_id, account)
  WHERE trial;
CREATE INDEX IF NOT EXISTS purchases_tenant_time ON purchases (tenant, create_ms, purchase_id);
CREATE INDEX IF NOT EXISTS purchases_account_time
  ON purchases (tenant, account, create_ms, purchase_id);
"""

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
                db.executescript(SCHEMA)
            self._db = db

        await asyncio.get_running_loop().run_in_executor(self._executor, connect)

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

    async def append(self, events: Sequence[Event], requests: Sequence[RequestRecord]) -> int:
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
                else:
                    other = _reference_holder(db, tenant, purchase_id, payment_reference)
                    if other is not None:
                        raise Rejected("PAYMENT_REFERENCE_USED", {"purchase_id": other})
                    db.execute(
                        "UPDATE purchases SET status = 'completed', payment_reference = ?,"
                        " lot_ids = ?, complete_ms = ? WHERE tenant = ? AND purchase_id = ?",
                        (payment_reference, lots, now_ms, *key),
                    )
                    db.executemany(f"{_INSERT_GRANT} ON CONFLICT DO NOTHING", grant_rows)
                return _purchase(db, tenant, purchase_id)

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
                db.execute(
                    "UPDATE purchases SET status = ?, refunded_credits = ?, spent_credits = ?"
                    " WHERE tenant = ? AND purchase_id = ? AND status = ?",
                    (to_status, refunded_credits, spent_credits, tenant, purchase_id, from_status),
                )
                return _purchase(db, tenant, purchase_id)

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
        where, params = purchase_filters(account, status, before, lambda: "?")
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
