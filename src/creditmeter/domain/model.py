"""The entities that cross the domain-storage seam: what the domain reads and writes, and
what storage maps its rows onto (dependency inversion: storage imports this module, and
no other of the domain).

- configuration: a pack as sold (`PackRow`), a webhook endpoint (`WebhookRow`);
- commerce: a purchase and a subscription, each with a snapshot of its pack;
- history: a transaction as one entry, the filters of a history query, usage rows;
- webhooks: a notice written with its change, and one delivery of an event to an endpoint.

A leaf: it imports the standard library only, so every layer may use it. The rules about
these entities live in the domain modules named after them (packs, purchases,
subscriptions, history, webhooks); the SQL that stores them in storage/ledger and
storage/config_store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


# --- configuration -------------------------------------------------------------------------
@dataclass(frozen=True)
class PackRow:
    """A pack as stored (columns of the packs table, in order)."""

    tenant: str
    pack_id: str
    name: str
    description: str
    credits: int
    bonus_credits: int
    price_minor: int
    currency: str
    validity_days: int
    recurrence: str
    rollover_cap: int
    priority: int
    active: bool
    trial: bool
    archived: bool
    create_ms: int
    update_ms: int

    def __post_init__(self) -> None:
        # SQLite hands back 0/1 for the flags.
        for flag in ("active", "trial", "archived"):
            object.__setattr__(self, flag, bool(getattr(self, flag)))


@dataclass(frozen=True)
class WebhookRow:
    """A tenant's webhook endpoint (creditmeter.domain.webhooks): event types and
    thresholds comma-joined; the signing secret in clear (the server signs with it)."""

    tenant: str
    endpoint_id: str
    url: str
    event_types: str
    thresholds: str
    description: str
    secret: str
    disabled: bool
    #: Why the server disabled it ("" when enabled, or disabled by the tenant).
    disabled_reason: str
    #: Since when every attempt to deliver to it failed (None while it answers).
    failing_since_ms: int | None
    create_ms: int
    update_ms: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "disabled", bool(self.disabled))  # SQLite's 0/1


# --- purchases and subscriptions -----------------------------------------------------------
@dataclass(frozen=True)
class PurchaseRecord:
    """A purchase of a pack, with a snapshot of the pack as bought."""

    purchase_id: str
    tenant: str
    account: str
    pack_id: str
    #: pending, completed, cancelled, expired or refunded.
    status: str
    #: "" until completed (and for trials).
    payment_reference: str
    pack_name: str
    price_minor: int
    currency: str
    credits: int
    bonus_credits: int
    #: The granted lots (credits lot, then bonus lot); empty until completed.
    lot_ids: tuple[str, ...]
    request_id: str
    fingerprint: str
    trial: bool
    create_ms: int
    complete_ms: int | None = None
    #: Pending purchases: when they expire.
    expire_ms: int | None = None
    refunded_credits: int = 0
    spent_credits: int = 0


@dataclass(frozen=True)
class SubscriptionRecord:
    """A subscription to a recurring pack, with a snapshot of the pack."""

    subscription_id: str
    tenant: str
    account: str
    pack_id: str
    #: active, or cancelled (no further periods; the current one runs out).
    status: str
    #: weekly, monthly or yearly.
    recurrence: str
    pack_name: str
    credits: int
    bonus_credits: int
    rollover_cap: int
    priority: int
    price_minor: int
    currency: str
    #: Start of period 0; period k starts k recurrences later.
    anchor_ms: int
    #: Periods granted so far (the next one to grant has this index).
    periods_granted: int
    #: Start of the next period to grant.
    next_period_ms: int
    request_id: str
    fingerprint: str
    create_ms: int
    cancel_ms: int | None = None


# --- history -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TxnQuery:
    """Filters for transaction history (empty tuples mean any)."""

    kinds: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    start_ms: int | None = None
    end_ms: int | None = None


@dataclass(frozen=True)
class Transaction:
    """The events of one transaction, read as one history entry."""

    txn: str
    kind: str
    tenant: str
    account: str
    seq: int
    ts_ms: int
    request_id: str
    feature: str
    units: int
    amount: int
    balance: int | None
    lines: list[tuple[str, int]] = field(default_factory=list)
    #: Credits of it that became debt (a charge past the lots, or a refund bringing back
    #: debt a purchase had repaid).
    debt_incurred: int = 0
    #: Credits of a grant that repaid debt first (not spendable: `amount` includes them).
    debt_repaid: int = 0
    #: The first event's reference (a recharge's pack: "set:<pack>" for a policy).
    reference: str = ""


class Period(StrEnum):
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True)
class UsageRow:
    period: str  # "YYYY-MM-DD" or "YYYY-MM", UTC
    feature: str
    credits: int
    units: int


# --- webhooks ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Notice:
    """A change webhooks report, stored in the transaction that made it: `kind` says what
    (NoticeKind), `data` its figures as JSON. Its id is made of the change's own ids, so a
    change written twice (a replayed batch, a retried call) leaves one notice."""

    notice_id: str
    tenant: str
    kind: str
    created_ms: int
    data: str


class NoticeKind(StrEnum):
    #: A transaction moved an account's spendable balance: {account, txn, before, after}.
    BALANCE = "balance"
    #: The server closed a silent call session: {account, session_id, txn, charged}.
    SESSION_TIMEOUT = "session_timeout"
    #: A purchase became completed, refunded or expired: the PurchaseRecord's fields.
    PURCHASE = "purchase"
    #: A subscription period was claimed (its grants staged): {subscription_id, account,
    #: pack_id, period, credits, bonus_credits}.
    SUBSCRIPTION_PERIOD = "subscription_period"
    #: A recharge fell due (its `recharge_due` event): {account, txn, threshold, before,
    #: after, pack_id}.
    RECHARGE_DUE = "recharge_due"


@dataclass(frozen=True)
class Delivery:
    """One webhook event's delivery to one endpoint, and how its attempts went."""

    delivery_id: str
    tenant: str
    endpoint_id: str
    event_id: str
    event_type: str
    #: The JSON body, exactly as sent (and signed).
    body: str
    #: pending, delivered or failed.
    status: str
    attempts: int
    create_ms: int
    #: When the next attempt is due (pending).
    next_attempt_ms: int
    #: A worker holding it until then is attempting it; another may take it after.
    lease_until_ms: int = 0
    last_attempt_ms: int | None = None
    last_status_code: int = 0
    last_error: str = ""
