"""Balance alerts: a balance falling to or below a threshold, reaching zero, or rising above
a threshold again, computed from the outbox events every change appends.

The balance is the spendable one (creditmeter.domain.balances), as every RPC answers it:
credit held by open call sessions does not count, so taking or letting go of a hold moves
it too. Every event that moves credit or a hold carries its amount and the figures after
it (credit in lots, reserved), so each transaction alone says where the spendable balance
was before and after (no state per account to keep). A watcher
reads the outboxes from positions of its own; its resume token is those positions, so a
reconnecting client resumes exactly after the last alert it received.

On an account with a credit line the events also carry the debt and the overdraft limit
after them: the spendable balance is the credit less the debt (never below 0), and
OVERDRAFT_LIMIT_REACHED fires when a transaction uses up what was left of the credit line
(nothing more can be charged: credit - reserved - debt + limit reaches 0).

Alerts are per transaction, not per event: a charge spanning two lots appends two events
with an intermediate balance no reader could ever observe (the script is atomic); the alert
reports the balance before and after the whole transaction, as the RPC's response does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum

from creditmeter.constants import (
    MAX_CREDITS,
    MAX_RESUME_TOKEN_LENGTH,
    MAX_WATCH_THRESHOLDS,
    RESUME_TOKEN_BYTES_PER_BUCKET,
)
from creditmeter.domain import balances
from creditmeter.domain.validation import Violations
from creditmeter.errors import InvalidRequest, ResumeTokenExpired
from creditmeter.storage import layout
from creditmeter.storage.layout import bucket_of
from creditmeter.storage.ledger.base import DEBT_SOURCE, HOLD_KINDS
from creditmeter.storage.outbox import STREAM_ID, OutboxReader, OutboxTxn
from creditmeter.storage.recharge import DUE_KIND

#: Event kinds that take credit out of the lots (the event's balance is after the removal),
#: that add it, and that take or let go of a hold. Anything else (options, request) moves
#: nothing.
_DECREASING = frozenset({"consume", "session", "expire", "reset", "refund"})
_INCREASING = frozenset({"grant"})
_HOLD, _RELEASE = HOLD_KINDS
#: The credit line's: a grant's lot repaying debt (credit and debt fall), a refund
#: bringing debt back (debt rises). A charge's part past the lots is a charge event with
#: no lot and source DEBT_SOURCE (debt rises, credit stays).
_REPAY, _DEBT = "repay", "debt"
_MOVING = _DECREASING | _INCREASING | {_HOLD, _RELEASE, _REPAY, _DEBT}
_TOKEN_VERSION = 1


class AlertKind(StrEnum):
    LOW = "low"
    DEPLETED = "depleted"
    TOPPED_UP = "topped_up"
    OVERDRAFT_LIMIT_REACHED = "overdraft_limit_reached"
    #: A recharge fell due (creditmeter.domain.recharge): sent whatever the thresholds.
    RECHARGE_DUE = "recharge_due"


@dataclass(frozen=True)
class Alert:
    kind: AlertKind
    account: str
    threshold: int
    previous_balance: int
    balance: int
    transaction_id: str
    time_ms: int
    resume_token: str
    #: RECHARGE_DUE: the policy's pack ('' = none).
    pack_id: str = ""


def _figures_before(e: Mapping[str, str]) -> tuple[int, int, int]:
    """Credit in lots, reserved credit and debt before an event, from those after it."""
    kind, amount = e["kind"], int(e["amount"])
    credit = int(e["balance"])
    reserved = int(e.get("reserved", "0"))  # entries of an earlier release carry none
    debt = int(e.get("debt", "0"))
    past_lots = kind in _DECREASING and not e.get("lot") and e.get("source") == DEBT_SOURCE
    if kind == _DEBT or past_lots:
        return credit, reserved, debt - amount
    if kind == _REPAY:
        return credit + amount, reserved, debt + amount
    if kind in _DECREASING:
        return credit + amount, reserved, debt
    if kind in _INCREASING:
        return credit - amount, reserved, debt
    if kind == _HOLD:
        return credit, reserved - amount, debt
    return credit, reserved + amount, debt


def _figures_after(e: Mapping[str, str]) -> tuple[int, int, int]:
    return int(e["balance"]), int(e.get("reserved", "0")), int(e.get("debt", "0"))


@dataclass(frozen=True)
class Change:
    """A transaction's spendable balance before and after it, and on an account with a
    credit line its limit and what was left of it (credit - reserved - debt + limit)
    before and after."""

    before: int
    after: int
    overdraft_limit: int = 0
    line_before: int = 0
    line_after: int = 0


def account_change(events: Sequence[Mapping[str, str]]) -> Change | None:
    """What a transaction's events did to the balance, or None if they move nothing or the
    account is unlimited (its events carry balance -1: it never alerts)."""
    moving = [e for e in events if e.get("kind", "") in _MOVING]
    if not moving or any(int(e["balance"]) < 0 for e in moving):
        return None
    credit, reserved, debt = _figures_before(moving[0])
    credit_after, reserved_after, debt_after = _figures_after(moving[-1])
    before = balances.spendable(credit - debt, reserved, unlimited=False)
    after = balances.spendable(credit_after - debt_after, reserved_after, unlimited=False)
    limit = int(moving[-1].get("od", "0"))
    return Change(
        before, after, limit,
        credit - reserved - debt + limit, credit_after - reserved_after - debt_after + limit,
    )  # fmt: skip


def balance_change(events: Sequence[Mapping[str, str]]) -> tuple[int, int] | None:
    """The spendable balance before and after a transaction's events (see
    `account_change`)."""
    change = account_change(events)
    return None if change is None else (change.before, change.after)


def recharge_due(
    events: Sequence[Mapping[str, str]],
) -> tuple[int, tuple[int, int], str] | None:
    """A transaction that is a recharge falling due (recharge_watch of _lib.lua): its
    threshold, the spendable balance before and after the call, and its pack."""
    if len(events) != 1 or events[0].get("kind") != DUE_KIND:
        return None
    e = events[0]
    credit, reserved, debt = _figures_after(e)
    after = balances.spendable(credit - debt, reserved, unlimited=False)
    return int(e["amount"]), (int(e["before"]), after), e.get("reference", "")


def crossings(before: int, after: int, thresholds: Sequence[int]) -> list[tuple[AlertKind, int]]:
    """The alerts of a change from `before` to `after` given the watched thresholds (zero is
    always watched), in the order the balance passed them: falling, LOW from the highest
    threshold down then DEPLETED; rising, TOPPED_UP from the lowest up."""
    levels = sorted({0, *thresholds})
    if after < before:
        found = [(AlertKind.LOW, t) for t in reversed(levels) if t > 0 and after <= t < before]
        if after == 0:
            found.append((AlertKind.DEPLETED, 0))
        return found
    return [(AlertKind.TOPPED_UP, t) for t in levels if before <= t < after]


def line_crossing(change: Change) -> list[tuple[AlertKind, int]]:
    """OVERDRAFT_LIMIT_REACHED (threshold: the limit) when the change used up what was left
    of the credit line."""
    if change.overdraft_limit > 0 and change.line_after <= 0 < change.line_before:
        return [(AlertKind.OVERDRAFT_LIMIT_REACHED, change.overdraft_limit)]
    return []


# --- resume tokens ------------------------------------------------------------------------
@dataclass(frozen=True)
class ResumePoint:
    """Where a watch stands: the position reached in each bucket read, and how many alerts
    of the next transaction of one bucket were already delivered (the token of an alert
    that is not the last of its transaction)."""

    scope: int
    positions: dict[int, str]
    skip: tuple[int, int] | None = None

    def encode(self) -> str:
        data: dict[str, object] = {
            "v": _TOKEN_VERSION,
            "s": self.scope,
            "p": {str(b): p for b, p in sorted(self.positions.items())},
        }
        if self.skip is not None:
            data["k"] = list(self.skip)
        raw = zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 9)
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> ResumePoint:
        """Parse a token; InvalidRequest on `resume_token` if it is not one of ours."""
        try:
            longest = MAX_RESUME_TOKEN_LENGTH + RESUME_TOKEN_BYTES_PER_BUCKET * layout.buckets()
            if len(token) > longest:
                raise ValueError("too long")
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            inflate = zlib.decompressobj()
            text = inflate.decompress(raw, longest * 8)
            if inflate.unconsumed_tail or not inflate.eof or inflate.unused_data:
                raise ValueError("too long, cut short, or trailing data")
            data = json.loads(text)
            if data["v"] != _TOKEN_VERSION:
                raise ValueError("version")
            positions = {int(b): str(p) for b, p in data["p"].items()}
            if not positions or not all(
                0 <= b < layout.buckets() and STREAM_ID.fullmatch(p) for b, p in positions.items()
            ):
                raise ValueError("positions")
            skip = None
            if "k" in data:
                bucket, count = (int(x) for x in data["k"])
                if bucket not in positions or count < 1:
                    raise ValueError("skip")
                skip = (bucket, count)
            return cls(int(data["s"]), positions, skip)
        except (ValueError, TypeError, KeyError, AttributeError, binascii.Error, zlib.error):
            raise InvalidRequest([("resume_token", "not a token WatchBalance issued")]) from None


def watch_scope(tenant: str, account: str) -> int:
    """What a token is bound to: one tenant and account (or the whole tenant, account "")."""
    return zlib.crc32(f"{tenant}\x00{account}".encode())


# --- watching --------------------------------------------------------------------------
@dataclass
class _Watch:
    tenant: str
    account: str
    thresholds: tuple[int, ...]
    scope: int
    positions: dict[int, str]
    #: Alerts of the first transaction of this bucket already delivered before a resume.
    skip: tuple[int, int] | None = None

    def relevant(self, txn: OutboxTxn) -> bool:
        return txn.tenant == self.tenant and (not self.account or txn.account == self.account)

    def process(self, txn: OutboxTxn) -> list[Alert]:
        """The alerts of one call's events (each of its transactions in turn); advances the
        position past them."""
        before = dict(self.positions)
        self.positions[txn.bucket] = txn.last_id
        skip = 0
        if self.skip is not None and self.skip[0] == txn.bucket:
            skip, self.skip = self.skip[1], None  # only the first call read there
        if not self.relevant(txn):
            return []
        found: list[tuple[AlertKind, int, tuple[int, int], str, int, str]] = []
        for txn_id, events in transactions_of(txn.events):
            time_ms = int(next((e["ts"] for e in reversed(events) if "ts" in e), "0"))
            due = recharge_due(events)
            if due is not None:
                threshold, moved, pack = due
                found.append((AlertKind.RECHARGE_DUE, threshold, moved, txn_id, time_ms, pack))
                continue
            effect = account_change(events)
            if effect is None:
                continue
            balance = (effect.before, effect.after)
            found.extend(
                (kind, threshold, balance, txn_id, time_ms, "")
                for kind, threshold in [
                    *crossings(*balance, self.thresholds), *line_crossing(effect)
                ]
            )
        alerts = []
        for i, (kind, threshold, change, txn_id, time_ms, pack) in enumerate(found):
            if i < skip:
                continue
            point = (
                ResumePoint(self.scope, dict(self.positions))
                if i == len(found) - 1
                else ResumePoint(self.scope, before, (txn.bucket, i + 1))
            )
            alerts.append(
                Alert(
                    kind=kind,
                    account=txn.account,
                    threshold=threshold,
                    previous_balance=change[0],
                    balance=change[1],
                    transaction_id=txn_id,
                    time_ms=time_ms,
                    resume_token=point.encode(),
                    pack_id=pack,
                )
            )
        return alerts


def transactions_of(
    events: Sequence[Mapping[str, str]],
) -> list[tuple[str, list[Mapping[str, str]]]]:
    """Events split into the runs of one transaction each, in order (what alerts and
    webhook notices are made per)."""
    runs: list[tuple[str, list[Mapping[str, str]]]] = []
    for event in events:
        txn = event.get("txn", "")
        if runs and runs[-1][0] == txn:
            runs[-1][1].append(event)
        else:
            runs.append((txn, [event]))
    return runs


class BalanceAlerts:
    """Opens balance watches. Each has its own outbox reader (and Redis connection)."""

    def __init__(
        self,
        open_reader: Callable[[Sequence[int]], OutboxReader],
        stopping: asyncio.Event,
        retention_s: int,
    ) -> None:
        self._open_reader = open_reader
        self._stopping = stopping
        self.retention_s = retention_s

    @asynccontextmanager
    async def watch(
        self, tenant: str, account: str, thresholds: Sequence[int], resume_token: str
    ) -> AsyncIterator[AsyncIterator[Alert]]:
        """Validate and put a watch in place; the iterator yields its alerts until the server
        stops. Every change committed after this returns is covered (or, with a token,
        every change after the token's alert)."""
        v = Violations()
        if account:
            v.account_id(account)
        # Repeating a value is harmless: the limit counts different ones.
        if v.count("thresholds", len(set(thresholds)), MAX_WATCH_THRESHOLDS, "different values"):
            for i, t in enumerate(thresholds):
                if not 1 <= t <= MAX_CREDITS:
                    v.add(f"thresholds[{i}]", "must be from 1 to 2^53-1")
        point = None
        if resume_token:
            try:
                point = ResumePoint.decode(resume_token)
            except InvalidRequest as error:
                v.items.extend(error.violations)
        v.raise_if_any()
        scope = watch_scope(tenant, account)
        buckets = [bucket_of(tenant, account)] if account else list(range(layout.buckets()))
        if point is not None and (point.scope != scope or set(point.positions) != set(buckets)):
            raise InvalidRequest([("resume_token", "issued for another watch")])
        reader = self._open_reader(buckets)
        try:
            levels = tuple(sorted(set(thresholds)))
            if point is None:
                state = _Watch(tenant, account, levels, scope, await reader.ends())
            else:
                await self._check_kept(reader, point.positions)
                state = _Watch(tenant, account, levels, scope, dict(point.positions), point.skip)
            alerts = self._alerts(reader, state)
            try:
                yield alerts
            finally:
                await alerts.aclose()  # before its reader goes, not whenever it is collected
        finally:
            await reader.aclose()

    async def _check_kept(self, reader: OutboxReader, positions: Mapping[int, str]) -> None:
        if await reader.trimmed_past(positions):
            raise ResumeTokenExpired(
                "the resume token is older than the retained outbox entries: read the "
                "balance and watch again without a token",
                {"retention_seconds": str(self.retention_s)},
            )

    async def _alerts(self, reader: OutboxReader, state: _Watch) -> AsyncGenerator[Alert, None]:
        while not self._stopping.is_set():
            read_from = dict(state.positions)
            txns = await reader.read(read_from)
            if not txns:
                continue
            # A watcher that fell a whole retention window behind (its client not reading)
            # may have had entries trimmed between its position and what it just read.
            await self._check_kept(reader, {t.bucket: read_from[t.bucket] for t in txns})
            for txn in txns:
                for alert in state.process(txn):
                    yield alert
