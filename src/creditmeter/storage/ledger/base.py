"""The ledger interface and its own records (events, request records, staged grants).

The entities it stores for the domain (purchases, subscriptions, transactions, notices,
deliveries) are defined in creditmeter.domain.model; this module maps them onto rows.

A backend stores:
- events: one row per outbox event (grant, consume, expire, reset, options), keyed by
  event id, inserted idempotently (a replayed batch inserts nothing twice);
- requests: the durable copy of every idempotency record (fingerprint and reply);
- staged grants: money-in written before it reaches Redis (ledger first). A staged grant
  counts as applied once its grant event, `<txn>:1`, is in the events table;
- webhook notices: the changes webhooks report (a balance moved, a purchase completed,
  refunded or expired, a subscription period granted, a session closed by the server),
  each written in the transaction of its change (an outbox), until the webhook worker
  fans it out into deliveries: one per endpoint that wants it, attempted until delivered.

Every backend runs the same test suite (tests/test_ledger_backends.py).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, astuple, dataclass
from typing import Any, NamedTuple

# The entities are the domain's (creditmeter.domain.model); the backends still import
# these names from here.
from creditmeter.domain.model import Delivery as Delivery
from creditmeter.domain.model import Notice as Notice
from creditmeter.domain.model import NoticeKind
from creditmeter.domain.model import Period as Period
from creditmeter.domain.model import PurchaseRecord as PurchaseRecord
from creditmeter.domain.model import SubscriptionRecord as SubscriptionRecord
from creditmeter.domain.model import Transaction as Transaction
from creditmeter.domain.model import TxnQuery as TxnQuery
from creditmeter.domain.model import UsageRow as UsageRow
from creditmeter.errors import BackendUnavailable

#: Event kinds that change a balance or options (`request` events go to the requests table).
#: The credit line adds `repay` (debt a grant repaid out of its lot, in the grant's
#: transaction) and `debt` (debt a refund brought back, in the refund's); the part of a
#: charge that became debt is a charge event with no lot and source DEBT_SOURCE.
EVENT_KINDS = (
    "grant", "consume", "session", "expire", "reset", "refund", "options", "usage_limit",
    "repay", "debt",
    "recharge_policy", "recharge_due",
)  # fmt: skip
#: The source of the charge event that records the part of a charge past the lots.
DEBT_SOURCE = "debt"
#: Kinds that only ever follow another kind's event in a transaction, and that a history
#: filter on that kind includes (the transaction's own events, not others').
COMPANION_KINDS = {"grant": ("repay",), "refund": ("debt",)}
#: Kinds that charge for usage: Consume, and the steps of call sessions.
CHARGE_KINDS = ("consume", "session")
#: Outbox entries that are not ledger events: a call session's hold on credit taken or let
#: go. Holds are hot state (a rebuild restores no open session), so only balance watchers
#: read these; the flusher acknowledges them without writing them.
HOLD_KINDS = ("hold", "release")


#: What a client is told while the ledger cannot be reached: no address, driver or error
#: class (the driver's error stays on the exception as its cause, for the logs).
UNAVAILABLE_MESSAGE = "the ledger is unavailable; retry later"


def ledger_unavailable() -> BackendUnavailable:
    """The error a backend raises while the ledger does not answer (`raise ... from cause`)."""
    return BackendUnavailable(UNAVAILABLE_MESSAGE, {"backend": "ledger"})


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value else None  # absent or "" (an empty field) is None


# Event and RequestRecord are NamedTuples, not frozen dataclasses like the other records:
# the flusher builds one per outbox entry (a million for a backlog of a million), and a
# frozen dataclass's __init__ costs 3 to 4 us in its object.__setattr__ calls against
# under 1 us for a tuple (measured). Their fields are also their table rows, in column
# order (EVENT_COLUMNS, the requests table), so the ledger inserts them as they are.


class Event(NamedTuple):
    """One outbox event, as the Lua scripts write it; fields in EVENT_COLUMNS order."""

    event_id: str
    tenant: str
    account: str
    kind: str
    txn: str
    seq: int
    request_id: str
    ts_ms: int
    lot: str = ""
    amount: int = 0
    balance: int | None = None
    feature: str = ""
    units: int = 0
    priority: int | None = None
    expires_at_ms: int | None = None
    source: str = ""
    reference: str = ""
    #: A bool: SQLite stores it as 0/1, PostgreSQL as BOOLEAN.
    unlimited: bool | None = None
    #: On a grant: the lot is a subscription period's (or its rollover's), whose credit
    #: expiring unused carries into the next period (renew.lua). Stored like `unlimited`.
    rolls_over: bool = False

    @classmethod
    def from_fields(cls, f: Mapping[str, str]) -> Event:
        get = f.get
        expires = get("expires_at")
        unlimited = get("unlimited")
        return cls._make(
            (
                f["event_id"], f["tenant"], f["account"], f["kind"], f["txn"], int(f["seq"]),
                get("request_id", ""), int(f["ts"]), get("lot", ""),
                int(get("amount") or 0), _int_or_none(get("balance")), get("feature", ""),
                int(get("units") or 0), _int_or_none(get("priority")),
                None if expires == "0" else _int_or_none(expires),  # "0" means never
                get("source", ""), get("reference", ""),
                None if unlimited is None else unlimited == "1", get("rolls_over") == "1",
            )
        )  # fmt: skip


class RequestRecord(NamedTuple):
    """The durable copy of an idempotency record; fields in the requests table's order."""

    tenant: str
    account: str
    request_id: str
    fingerprint: str
    reply: str
    txn: str
    ts_ms: int

    @classmethod
    def from_fields(cls, f: Mapping[str, str]) -> RequestRecord:
        return cls._make(
            (f["tenant"], f["account"], f["request_id"], f["fp"], f["reply"], f["txn"],
             int(f["ts"]))
        )  # fmt: skip


@dataclass(frozen=True)
class StagedGrant:
    """Money-in written to the ledger before it is applied to Redis."""

    tenant: str
    account: str
    request_id: str
    fingerprint: str
    txn: str
    lot_id: str
    amount: int
    priority: int
    expires_at_ms: int | None
    source: str
    reference: str
    created_ms: int
    #: Which call staged it: "grant" (Grant), "add" (SetBalance), "reset" (SetBalance with
    #: reset). Decides the script that applies it, so a re-application replays the same call.
    operation: str = "grant"

    @property
    def event_id(self) -> str:
        """The id of the grant event that confirms this grant reached Redis."""
        return f"{self.txn}:1"


#: Purchase statuses a notice is written for.
NOTICE_PURCHASE_STATUSES = ("completed", "refunded", "expired")


def purchase_notice(p: PurchaseRecord, now_ms: int) -> Notice:
    data = asdict(p)
    data["lot_ids"] = list(p.lot_ids)
    return Notice(
        f"purchase:{p.purchase_id}:{p.status}", p.tenant, NoticeKind.PURCHASE, now_ms,
        json.dumps(data, separators=(",", ":")),
    )  # fmt: skip


def period_notice(sub: SubscriptionRecord, period: int, now_ms: int) -> Notice:
    data = {
        "subscription_id": sub.subscription_id, "account": sub.account,
        "pack_id": sub.pack_id, "period": period, "credits": sub.credits,
        "bonus_credits": sub.bonus_credits,
    }  # fmt: skip
    return Notice(
        f"period:{sub.subscription_id}:{period}", sub.tenant, NoticeKind.SUBSCRIPTION_PERIOD,
        now_ms, json.dumps(data, separators=(",", ":")),
    )  # fmt: skip


def notice_row(n: Notice) -> tuple[Any, ...]:
    return (n.notice_id, n.tenant, n.kind, n.created_ms, n.data)


DELIVERY_COLUMNS = (
    "delivery_id, tenant, endpoint_id, event_id, event_type, body, status, attempts,"
    " create_ms, next_attempt_ms, lease_until_ms, last_attempt_ms, last_status_code,"
    " last_error"
)
DELIVERY_COLUMN_COUNT = 14


def delivery_row(d: Delivery) -> tuple[Any, ...]:
    return astuple(d)


def delivery_from_row(r: Sequence[Any]) -> Delivery:
    return Delivery(*r)


def group_transactions(events: Sequence[Event]) -> list[Transaction]:
    """Fold events (ordered by seq) into transactions, in the order of their first event."""
    by_txn: dict[str, list[Event]] = {}
    for e in events:
        by_txn.setdefault(e.txn, []).append(e)
    result = []
    for txn, rows in by_txn.items():
        first = rows[0]
        # The credit line's events: not credits moved in or out of the lots by the
        # transaction's own kind, but what of it went to or came from the debt.
        repaid = sum(r.amount for r in rows if r.kind == "repay")
        restored = sum(r.amount for r in rows if r.kind == "debt")
        charged = sum(r.amount for r in rows if r.source == DEBT_SOURCE and not r.lot)
        moved = [r for r in rows if r.kind not in ("repay", "debt")] or rows
        result.append(
            Transaction(
                txn=txn,
                kind=first.kind,
                tenant=first.tenant,
                account=first.account,
                seq=first.seq,
                ts_ms=first.ts_ms,
                request_id=first.request_id,
                feature=first.feature,
                units=sum(r.units for r in rows),
                amount=sum(r.amount for r in moved),
                balance=rows[-1].balance,
                lines=[(r.lot, r.amount) for r in moved if r.lot],
                debt_incurred=charged + restored,
                debt_repaid=repaid,
                reference=first.reference,
            )
        )
    return result


# --- rows, shared by the SQL backends ----------------------------------------------------
# Column orders match the tables: events (EVENT_COLUMNS), requests and staged_grants (the
# fields of RequestRecord and StagedGrant, in order).

EVENT_COLUMNS = (
    "event_id, tenant, account, kind, txn, seq, request_id, ts_ms, lot, amount, balance,"
    " feature, units, priority, expires_at, source, reference, unlimited, rolls_over"
)


def event_from_row(r: Sequence[Any]) -> Event:
    """An Event from a row of EVENT_COLUMNS (SQLite gives the bools as 0/1)."""
    return Event._make((*r[:17], None if r[17] is None else bool(r[17]), bool(r[18])))


def grant_row(g: StagedGrant) -> tuple[Any, ...]:
    return (
        g.tenant, g.account, g.request_id, g.fingerprint, g.txn, g.lot_id, g.amount,
        g.priority, g.expires_at_ms, g.source, g.reference, g.created_ms, g.operation,
    )  # fmt: skip


#: The purchases table's columns, in the order of PurchaseRecord's fields.
PURCHASE_COLUMNS = (
    "purchase_id, tenant, account, pack_id, status, payment_reference, pack_name, price_minor,"
    " currency, credits, bonus_credits, lot_ids, request_id, fingerprint, trial, create_ms,"
    " complete_ms, expire_ms, refunded_credits, spent_credits"
)
PURCHASE_COLUMN_COUNT = 20


def join_lot_ids(lot_ids: Sequence[str]) -> str:
    """Lot ids as stored: comma-joined ("" for none)."""
    if any(not lot or "," in lot for lot in lot_ids):
        raise ValueError(f"lot ids must be non-empty and free of commas: {lot_ids!r}")
    return ",".join(lot_ids)


def purchase_row(p: PurchaseRecord) -> tuple[Any, ...]:
    return (
        p.purchase_id, p.tenant, p.account, p.pack_id, p.status, p.payment_reference,
        p.pack_name, p.price_minor, p.currency, p.credits, p.bonus_credits,
        join_lot_ids(p.lot_ids), p.request_id, p.fingerprint,
        p.trial,  # a bool: SQLite stores it as 0/1, PostgreSQL as BOOLEAN
        p.create_ms, p.complete_ms, p.expire_ms, p.refunded_credits, p.spent_credits,
    )  # fmt: skip


def purchase_from_row(r: Sequence[Any]) -> PurchaseRecord:
    """A PurchaseRecord from a row of PURCHASE_COLUMNS."""
    return PurchaseRecord(
        purchase_id=r[0], tenant=r[1], account=r[2], pack_id=r[3], status=r[4],
        payment_reference=r[5], pack_name=r[6], price_minor=r[7], currency=r[8],
        credits=r[9], bonus_credits=r[10], lot_ids=tuple(r[11].split(",")) if r[11] else (),
        request_id=r[12], fingerprint=r[13], trial=bool(r[14]), create_ms=r[15],
        complete_ms=r[16], expire_ms=r[17], refunded_credits=r[18], spent_credits=r[19],
    )  # fmt: skip


SUBSCRIPTION_COLUMNS = (
    "subscription_id, tenant, account, pack_id, status, recurrence, pack_name, credits,"
    " bonus_credits, rollover_cap, priority, price_minor, currency, anchor_ms,"
    " periods_granted, next_period_ms, request_id, fingerprint, create_ms, cancel_ms"
)


def subscription_row(sub: SubscriptionRecord) -> tuple[Any, ...]:
    """The row of SUBSCRIPTION_COLUMNS (the dataclass's fields, in order)."""
    return astuple(sub)


def subscription_from_row(r: Sequence[Any]) -> SubscriptionRecord:
    return SubscriptionRecord(*r)


class EventLog(ABC):
    """The events of every change, with the idempotency records and webhook notices written
    beside them: appended by the flusher, read by history, reports, audit and rebuild."""

    @abstractmethod
    async def append(
        self,
        events: Sequence[Event],
        requests: Sequence[RequestRecord],
        notices: Sequence[Notice] = (),
    ) -> int:
        """Insert events, request records and webhook notices in one transaction, skipping
        ids already present; returns how many events were new. Committed when it returns."""

    @abstractmethod
    async def transactions(
        self, tenant: str, account: str, query: TxnQuery, limit: int, before_seq: int | None
    ) -> list[Transaction]:
        """The account's transactions newest first (by the seq of their first event), those
        starting before `before_seq` if given, at most `limit`."""

    @abstractmethod
    async def usage(
        self,
        tenant: str,
        account: str | None,
        start_ms: int,
        end_ms: int,
        period: Period,
        feature: str | None,
    ) -> list[UsageRow]:
        """Credits and units consumed per period (UTC) and feature, in [start, end)."""

    @abstractmethod
    def scan(self, tenant: str | None = None, account: str | None = None) -> AsyncIterator[Event]:
        """Every event (of a tenant, of an account), ordered by tenant, account, seq."""

    @abstractmethod
    async def requests_since(self, ts_ms: int) -> list[RequestRecord]:
        """Request records written at or after `ts_ms` (to restore idempotency records)."""

    @abstractmethod
    async def event_count(self) -> int: ...

    @abstractmethod
    async def unbought_recharges(self, since_ms: int, limit: int) -> list[Event]:
        """`recharge_due` events at or after `since_ms` that name a pack and have no
        purchase yet with request id "recharge:<their txn>" (creditmeter.domain.recharge),
        oldest first, at most `limit`."""


class Staging(ABC):
    """Money in, ledger first (creditmeter.domain.staging): a grant staged before it reaches
    Redis, withdrawn if Redis refuses it, and found again if it never got there."""

    @abstractmethod
    async def stage_grant(self, grant: StagedGrant) -> StagedGrant:
        """Record money-in before it reaches Redis. A retry (same tenant, account, request
        id and fingerprint) returns the first staged grant; the same request id with another
        fingerprint raises Rejected(IDEMPOTENCY_KEY_REUSED)."""

    @abstractmethod
    async def withdraw_grant(self, grant: StagedGrant) -> None:
        """Remove a staged grant that Redis refused (it never became credit)."""

    @abstractmethod
    async def unapplied_grants(self, created_before_ms: int, limit: int) -> list[StagedGrant]:
        """Staged grants older than the cutoff whose grant event is not in the ledger."""


class Commerce(Staging):
    """Purchases and subscriptions (creditmeter.domain.purchases, .subscriptions): rows the
    ledger owns, changed in one transaction with the grants they stage (hence a Staging
    too: a sale's lots and a period's are staged like any grant)."""

    @abstractmethod
    async def create_purchase(
        self, purchase: PurchaseRecord, grants: Sequence[StagedGrant]
    ) -> tuple[PurchaseRecord, bool]:
        """Insert a purchase and stage its grants, in one transaction.

        Returns (the purchase, True) when inserted. Returns (the existing purchase, False),
        inserting nothing, when the tenant already has a purchase with the same request id,
        or a completed or refunded one with the same non-empty payment reference, or (for a
        trial) a completed or refunded purchase of the same pack by the same account. Safe
        under concurrency: unique indexes decide, so exactly one of racing inserts wins.
        """

    @abstractmethod
    async def complete_purchase(
        self,
        tenant: str,
        purchase_id: str,
        payment_reference: str,
        lot_ids: tuple[str, ...],
        now_ms: int,
        grants: Sequence[StagedGrant],
    ) -> PurchaseRecord | None:
        """Complete a pending purchase and stage its grants, in one transaction.

        Only a purchase that is pending and not expired (expire_ms > now_ms) changes: it
        becomes completed with the payment reference, lot ids and complete_ms = now_ms. A
        pending purchase past its expiry becomes expired instead. Returns the purchase as
        it is afterwards (None if there is none). Raises Rejected(PAYMENT_REFERENCE_USED,
        {"purchase_id": <the other purchase>}) when another purchase of the tenant was
        completed with that reference.
        """

    @abstractmethod
    async def update_purchase_status(
        self,
        tenant: str,
        purchase_id: str,
        from_status: str,
        to_status: str,
        refunded_credits: int = 0,
        spent_credits: int = 0,
    ) -> PurchaseRecord | None:
        """Compare-and-set the status (and refund figures); returns the purchase as it is
        afterwards, changed or not (None if there is none)."""

    @abstractmethod
    async def get_purchase(self, tenant: str, purchase_id: str) -> PurchaseRecord | None: ...

    @abstractmethod
    async def list_purchases(
        self,
        tenant: str,
        account: str | None,
        status: str | None,
        limit: int,
        before: tuple[int, str] | None,
    ) -> list[PurchaseRecord]:
        """Purchases newest first, by (create_ms, purchase_id) descending, strictly before
        `before` if given."""

    @abstractmethod
    async def expire_purchases(self, now_ms: int, limit: int) -> int:
        """Mark pending purchases past their expiry expired (with their notices); returns
        how many."""

    @abstractmethod
    async def create_subscription(self, sub: SubscriptionRecord) -> tuple[SubscriptionRecord, bool]:
        """Insert a subscription; (it, True), or (the existing one, False) when the tenant
        already has one with the same request id."""

    @abstractmethod
    async def get_subscription(
        self, tenant: str, subscription_id: str
    ) -> SubscriptionRecord | None: ...

    @abstractmethod
    async def due_subscriptions(self, now_ms: int, limit: int) -> list[SubscriptionRecord]:
        """Active subscriptions (of every tenant) whose next period starts at or before now."""

    @abstractmethod
    async def claim_period(
        self,
        tenant: str,
        subscription_id: str,
        period: int,
        next_period_ms: int,
        grants: Sequence[StagedGrant],
    ) -> bool:
        """Claim period `period` of an active subscription, once: in one transaction, if
        periods_granted == period, set it to period + 1 and next_period_ms, and stage the
        period's grants. False (nothing changed) if another process claimed it first or
        the subscription is not active."""

    @abstractmethod
    async def cancel_subscription(
        self, tenant: str, subscription_id: str, now_ms: int
    ) -> SubscriptionRecord | None:
        """Active -> cancelled (cancel_ms = now); returns the subscription afterwards."""


class WebhookFeed(ABC):
    """Webhook notices fanned out into deliveries, claimed under leases, attempted, listed
    and pruned (creditmeter.domain.webhooks)."""

    @abstractmethod
    async def pending_notices(self, limit: int) -> list[Notice]:
        """Notices not fanned out yet, oldest first."""

    @abstractmethod
    async def fan_out(self, notice_ids: Sequence[str], deliveries: Sequence[Delivery]) -> None:
        """In one transaction: insert the deliveries (skipping ids present: two workers
        fanning out one notice make each delivery once) and remove the notices."""

    @abstractmethod
    async def claim_deliveries(self, now_ms: int, lease_ms: int, limit: int) -> list[Delivery]:
        """Pending deliveries due by `now_ms` that no worker holds, now held by the caller
        until `now_ms + lease_ms` (each claimed by one caller of racing ones), earliest due
        first."""

    @abstractmethod
    async def record_attempt(self, delivery: Delivery) -> None:
        """Store a delivery's state after an attempt (status, attempts, next attempt, last
        answer), letting go of its lease."""

    @abstractmethod
    async def add_delivery(self, delivery: Delivery) -> Delivery:
        """Insert a delivery unless its id is present; returns the stored one."""

    @abstractmethod
    async def get_delivery(self, tenant: str, delivery_id: str) -> Delivery | None: ...

    @abstractmethod
    async def list_deliveries(
        self,
        tenant: str,
        endpoint_id: str | None,
        status: str | None,
        limit: int,
        before: tuple[int, str] | None,
    ) -> list[Delivery]:
        """Deliveries newest first, by (create_ms, delivery_id) descending, strictly before
        `before` if given."""

    @abstractmethod
    async def prune_deliveries(self, before_ms: int, limit: int) -> int:
        """Remove up to `limit` deliveries made before `before_ms` that are done (delivered
        or failed); returns how many."""


class Ledger(EventLog, Commerce, WebhookFeed):
    """A durable, append-only store of events. Safe for several processes at once. Its
    roles are the classes above; a part of the domain that needs only one depends on
    that one (recovery alone takes it whole: it replays events, idempotency records and
    staged grants)."""

    @abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if needed.

        Raises BackendUnavailable when the ledger does not answer: the caller may call
        `open` again later (`connection.LedgerLink` does). Anything else, such as refused
        credentials or a missing database, is a configuration error. Until `open` has
        succeeded, every other call raises BackendUnavailable."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> None:
        """Raise if the ledger cannot take writes."""


