"""Audit and rebuild: the ledger is the source of truth for every account's state.

Replaying an account's events (in seq order) gives its lots, remaining credit, totals and
options. The audit compares that with Redis; the rebuild writes it back into Redis after
data loss, along with the idempotency records of the last day.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from creditmeter.constants import DEFAULT_PRIORITY, IDEMPOTENCY_TTL_S
from creditmeter.domain.ids import SESSION_TXN_PREFIX, new_id
from creditmeter.domain.limits import (
    LimitBook,
    LimitPeriod,
    UsageLimit,
    applying,
    period_bounds,
)
from creditmeter.domain.lots import LotSource, burn_key
from creditmeter.domain.staging import apply_staged
from creditmeter.errors import CreditError, Rejected
from creditmeter.storage.account import AccountImage
from creditmeter.storage.credit_line import CreditLine
from creditmeter.storage.layout import AccountKeys
from creditmeter.storage.ledger.base import CHARGE_KINDS, DEBT_SOURCE, Event, Ledger
from creditmeter.storage.limits import (
    Counter,
    OwnLimit,
    limit_event,
    options_event,
    options_overdraft,
)
from creditmeter.storage.recharge import POLICY_KIND, OwnPolicy, policy_event
from creditmeter.storage.redis_store import AccountSnapshot, Call, LotRecord, RedisStore
from creditmeter.storage.totals import Totals

TOTALS = ("granted", "used", "expired", "removed", "refunded")
#: Kinds that take a lot's remaining credit out, and the total each adds to.
_REMOVALS = {"expire": "expired", "reset": "removed", "refund": "refunded"}


@dataclass
class LotState:
    amount: int
    remaining: int
    priority: int
    expires_at_ms: int | None
    source: str
    reference: str
    created_ms: int
    #: A subscription period's lot (or its rollover's): what expires unused carries into
    #: the next period, under carry[reference] (the subscription id).
    rolls_over: bool = False


@dataclass
class AccountState:
    """An account as its events say it is."""

    tenant: str
    account: str
    lots: dict[str, LotState] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOTALS, 0))
    #: Credits consumed out of lots (unlimited accounts consume without lots).
    lot_used: int = 0
    #: Per feature: credits and units charged.
    features: dict[str, tuple[int, int]] = field(default_factory=dict)
    unlimited: bool | None = None
    seq: int = 0
    #: Per subscription, credits of its periods that expired unused since its last renewal
    #: (renew.lua's carry:<subscription>, the base of the next rollover).
    carry: dict[str, int] = field(default_factory=dict)
    #: Usage limits: the account's time zone and exemption, its own limits by (feature,
    #: period), and the charges (time, feature, units, credits) since `recent_since_ms`
    #: (None: not kept), of which the counters of the current periods are made.
    time_zone: str = ""
    exempt: bool = False
    own_limits: dict[tuple[str, str], OwnLimit] = field(default_factory=dict)
    recent_since_ms: int | None = None
    charges: list[tuple[int, str, int, int]] = field(default_factory=list)
    #: The credit line: the overdraft limit, the debt, and per lot the debt its grant
    #: repaid and its amount (rp:<lot>, until a refund brings the debt back).
    overdraft: int = 0
    debt: int = 0
    repaid: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Credits of lots that went to repay debt.
    lot_repaid: int = 0
    #: The account's own recharge policy (None: the tenant's applies).
    recharge: OwnPolicy | None = None

    def apply(self, e: Event) -> None:
        self.seq = max(self.seq, e.seq)
        if e.kind == "grant":
            priority = DEFAULT_PRIORITY if e.priority is None else e.priority
            self.lots[e.lot] = LotState(
                e.amount, e.amount, priority, e.expires_at_ms, e.source, e.reference, e.ts_ms,
                e.rolls_over,
            )  # fmt: skip
            self.totals["granted"] += e.amount
            if e.rolls_over and e.source != LotSource.ROLLOVER:
                self.carry.pop(e.reference, None)  # a renewal took the carry
        elif e.kind in CHARGE_KINDS:
            self.totals["used"] += e.amount
            credits, units = self.features.get(e.feature, (0, 0))
            self.features[e.feature] = (credits + e.amount, units + e.units)
            if e.lot:
                self.lots[e.lot].remaining -= e.amount
                self.lot_used += e.amount
            elif e.source == DEBT_SOURCE:
                self.debt += e.amount
            if self.recent_since_ms is not None and e.ts_ms >= self.recent_since_ms:
                self.charges.append((e.ts_ms, e.feature, e.units, e.amount))
        elif e.kind in _REMOVALS:
            lot = self.lots[e.lot]
            lot.remaining -= e.amount
            self.totals[_REMOVALS[e.kind]] += e.amount
            if e.kind == "expire" and lot.rolls_over:
                self.carry[lot.reference] = self.carry.get(lot.reference, 0) + e.amount
        elif e.kind == "repay":
            lot = self.lots[e.lot]
            lot.remaining -= e.amount
            self.lot_repaid += e.amount
            self.debt -= e.amount
            self.repaid[e.lot] = (e.amount, lot.amount)
        elif e.kind == "debt":
            self.debt += e.amount
            self.repaid.pop(e.lot, None)
        elif e.kind == "options":
            self.unlimited = e.unlimited
            self.time_zone, self.exempt = options_event(e.reference)
            self.overdraft = options_overdraft(e.reference)
        elif e.kind == "usage_limit":
            feature, period, own = limit_event(e.feature, e.amount, e.reference)
            if own is None:
                self.own_limits.pop((feature, period), None)
            else:
                self.own_limits[feature, period] = own
        elif e.kind == POLICY_KIND:
            self.recharge = policy_event(e.amount, e.reference)

    def applying_limits(self, tenant_limits: Iterable[UsageLimit]) -> set[tuple[str, str]]:
        """The (feature, period) of every limit that applies to the account."""
        found = applying(tenant_limits, self.own_limits.values(), self.exempt)
        return {(limit.feature, str(limit.period)) for limit, _ in found}

    def counters(self, now_ms: int, tenant_limits: Iterable[UsageLimit]) -> list[Counter]:
        """The limit counters of the current periods, as the ledger's charges make them
        (nothing held: a rebuild restores no open session)."""
        bounds = period_bounds(self.time_zone, now_ms)
        out = []
        for feature, period in sorted(self.applying_limits(tenant_limits)):
            start, end = bounds[LimitPeriod(period)]
            units = credits = 0
            for ts, charged, n, amount in self.charges:
                if charged == feature and start <= ts < end:
                    units += n
                    credits += amount
            out.append(Counter(feature, period, start, units, credits, 0, 0))
        return out

    @property
    def balance(self) -> int:
        return sum(lot.remaining for lot in self.lots.values())

    def live_lots(self) -> dict[str, int]:
        return {lot_id: lot.remaining for lot_id, lot in self.lots.items() if lot.remaining > 0}

    def image(self, now_ms: int, tenant_limits: Iterable[UsageLimit]) -> AccountImage:
        """The account as a rebuild writes it (at `now_ms`: the current periods' counters)."""
        t = self.totals
        return AccountImage(
            balance=self.balance,
            seq=self.seq,
            totals=Totals(t["granted"], t["used"], t["expired"], t["removed"], t["refunded"],
                          dict(self.features)),
            unlimited=self.unlimited,
            carry=dict(self.carry),
            time_zone=self.time_zone,
            exempt=self.exempt,
            own_limits=list(self.own_limits.values()),
            counters=self.counters(now_ms, tenant_limits),
            overdraft=self.overdraft,
            debt=self.debt,
            repaid=dict(self.repaid),
            recharge=self.recharge,
        )  # fmt: skip


async def replay(
    events: AsyncIterator[Event], recent_since_ms: int | None = None
) -> AsyncIterator[AccountState]:
    """Fold a scan (ordered by tenant, account, seq) into one state per account, keeping
    the charges since `recent_since_ms` (for the usage limits' counters)."""
    state: AccountState | None = None
    async for e in events:
        if state is None or (state.tenant, state.account) != (e.tenant, e.account):
            if state is not None:
                yield state
            state = AccountState(e.tenant, e.account, recent_since_ms=recent_since_ms)
        state.apply(e)
    if state is not None:
        yield state


@dataclass(frozen=True)
class Drift:
    tenant: str
    account: str
    problems: list[str]


def compare(
    state: AccountState,
    snap: AccountSnapshot,
    now_ms: int | None = None,
    tenant_limits: list[UsageLimit] | None = None,
) -> list[str]:
    """What differs between an account's ledger state and its Redis snapshot."""
    problems = []
    ledger_lots = state.live_lots()
    redis_lots = {lot.lot_id: lot.remaining for lot in snap.lots if lot.remaining > 0}
    if ledger_lots != redis_lots:
        problems.append(f"lots: ledger {ledger_lots} != redis {redis_lots}")
    identity = state.totals["granted"] - state.lot_used - state.totals["expired"]
    identity -= state.totals["removed"] + state.totals["refunded"] + state.lot_repaid
    if identity != snap.balance:
        problems.append(
            f"balance: grants - consumption - expiry - resets - refunds - repayments"
            f" = {identity} != redis {snap.balance}"
        )
    ledger_line = CreditLine(state.overdraft, state.debt, state.repaid)
    redis_line = snap.credit_line
    if ledger_line != redis_line:
        problems.append(f"credit line: ledger {ledger_line} != redis {redis_line}")
    redis_totals = snap.totals.counts()
    for name in TOTALS:
        if state.totals[name] != redis_totals[name]:
            problems.append(f"{name}: ledger {state.totals[name]} != redis {redis_totals[name]}")
    problems.extend(_limit_drift(state, snap, now_ms, tenant_limits or []))
    return problems


def _limit_drift(
    state: AccountState, snap: AccountSnapshot, now_ms: int | None, tenant_limits: list[UsageLimit]
) -> list[str]:
    """What differs in the usage limits: the account's options and own limits exactly;
    a counter of the current period may count less than the ledger's charges (a limit
    counts from when it applies) but never more."""
    problems = []
    zone, exempt = snap.time_zone, snap.exempt
    if (state.time_zone, state.exempt) != (zone, exempt):
        problems.append(
            f"limit options: ledger (time zone {state.time_zone!r}, exempt {state.exempt})"
            f" != redis ({zone!r}, {exempt})"
        )
    own = {(o.feature, o.period): o for o in snap.own_limits}
    if own != state.own_limits:
        problems.append(f"own limits: ledger {state.own_limits} != redis {own}")
    recharge = snap.own_policy
    if recharge != state.recharge:
        problems.append(f"own recharge policy: ledger {state.recharge} != redis {recharge}")
    if now_ms is None:
        return problems
    held = snap.counters
    for counted in state.counters(now_ms, tenant_limits):
        c = held.get((counted.feature, counted.period))
        if c is None or c.start_ms != counted.start_ms:
            continue
        if c.units > counted.units or c.credits > counted.credits:
            problems.append(
                f"limit counter {counted.feature}/{counted.period}: redis counted {c.units}"
                f" units, {c.credits} credits; the ledger's charges in the period are"
                f" {counted.units} units, {counted.credits} credits"
            )
    return problems


def restore_lots(state: AccountState) -> list[LotRecord]:
    """The account's live lots, with their burn keys (what a rebuild restores)."""
    return [
        LotRecord(
            lot_id=lot_id,
            amount=lot.amount,
            remaining=lot.remaining,
            priority=lot.priority,
            expires_at_ms=lot.expires_at_ms,
            source=lot.source,
            reference=lot.reference,
            created_ms=lot.created_ms,
            burn_key=burn_key(
                lot.priority, lot.expires_at_ms, LotSource(lot.source), lot.created_ms, lot_id
            ),
            rolls_over=lot.rolls_over,
        )
        for lot_id, lot in state.lots.items()
        if lot.remaining > 0
    ]


#: How far back charges are kept for the usage limits' counters: the longest period (a
#: month) and a time zone's offset, with room to spare.
_LIMIT_LOOKBACK_MS = 35 * 86_400_000


class Recovery:
    def __init__(self, ledger: Ledger, store: RedisStore, limits: LimitBook | None = None):
        self.ledger = ledger
        self.store = store
        #: The tenants' usage limits (from the config store): their counters are checked
        #: and rebuilt too. None: only the accounts' own limits.
        self.limits = limits or LimitBook()
        self._now_ms: int | None = None

    async def audit(
        self, tenant: str | None = None, wait_s: float = 10.0, now_ms: int | None = None
    ) -> tuple[int, list[Drift]]:
        """Check every account; returns (accounts checked, drifts). With `now_ms`, the
        usage limits' counters of the periods then are checked against the charges.

        Works beside a running server: each account is compared at the seq its Redis
        snapshot has, waiting (up to `wait_s`) for the flusher to bring the ledger there.
        """
        self._now_ms = now_ms
        seen: set[tuple[str, str]] = set()
        drifts: list[Drift] = []
        async for state in replay(self.ledger.scan(tenant), self._since()):
            seen.add((state.tenant, state.account))
            problems = await self._check(state, wait_s)
            if problems:
                drifts.append(Drift(state.tenant, state.account, problems))
        # Accounts Redis has and the ledger does not (their events never arrived).
        for (t, account), seq in (await self.store.account_seqs()).items():
            if (t, account) in seen or (tenant is not None and t != tenant):
                continue
            state = await self._caught_up(
                AccountState(t, account, recent_since_ms=self._since()), seq, wait_s
            )
            seen.add((t, account))
            problems = await self._check(state, wait_s)
            if problems:
                drifts.append(Drift(t, account, problems))
        return len(seen), drifts

    def _since(self) -> int | None:
        return None if self._now_ms is None else self._now_ms - _LIMIT_LOOKBACK_MS

    async def _account_state(self, tenant: str, account: str, upto: int) -> AccountState:
        state = AccountState(tenant, account, recent_since_ms=self._since())
        async for e in self.ledger.scan(tenant, account):
            if e.seq <= upto:
                state.apply(e)
        return state

    async def _caught_up(self, state: AccountState, seq: int, wait_s: float) -> AccountState:
        deadline = asyncio.get_running_loop().time() + wait_s
        while state.seq < seq and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
            state = await self._account_state(state.tenant, state.account, seq)
        return state

    async def _check(self, state: AccountState, wait_s: float) -> list[str]:
        snap = await self.store.snapshot(AccountKeys(state.tenant, state.account))
        redis_seq = snap.seq
        if state.seq > redis_seq:
            return [f"seq: ledger has events up to {state.seq}, redis only {redis_seq}"]
        if state.seq < redis_seq:
            state = await self._caught_up(state, redis_seq, wait_s)
            snap = await self.store.snapshot(AccountKeys(state.tenant, state.account))
            if state.seq != snap.seq:
                at = snap.seq
                return [f"seq: redis is at {at}, ledger at {state.seq} (flusher behind or lost)"]
            state = await self._account_state(state.tenant, state.account, snap.seq)
        return compare(state, snap, self._now_ms, self.limits.of(state.tenant))

    async def rebuild(self, now_ms: int, replace: bool = False) -> tuple[int, int, list[str]]:
        """Restore Redis from the ledger; returns (accounts, idempotency records, skipped)."""
        accounts = 0
        skipped: list[str] = []
        async for state in replay(self.ledger.scan(), now_ms - _LIMIT_LOOKBACK_MS):
            lots = restore_lots(state)
            call = Call(now_ms=now_ms, txn=new_id("rst", now_ms))
            image = state.image(now_ms, self.limits.of(state.tenant))
            try:
                keys = AccountKeys(state.tenant, state.account)
                await self.store.restore(keys, call, image, lots, replace)
                accounts += 1
            except Rejected:
                skipped.append(f"{state.tenant}/{state.account}")
        restored = 0
        horizon = now_ms - IDEMPOTENCY_TTL_S * 1000
        for r in await self.ledger.requests_since(horizon):
            ttl = max(1, (r.ts_ms - horizon) // 1000)
            session = (
                r.request_id.rpartition("#")[0]
                if r.txn.startswith(f"{SESSION_TXN_PREFIX}_")
                else None
            )
            await self.store.restore_request(
                AccountKeys(r.tenant, r.account), r.request_id, r.fingerprint, r.reply, ttl,
                session_id=session,
            )  # fmt: skip
            restored += 1
        await self._apply_staged(now_ms)
        return accounts, restored, skipped

    async def _apply_staged(self, now_ms: int) -> int:
        """Money-in staged in the ledger that never reached Redis: apply it now, through
        the same scripts and under the same ids, on top of the restored state."""
        applied = 0
        for staged in await self.ledger.unapplied_grants(now_ms + 1, 1_000_000):
            try:
                await apply_staged(self.store, self.ledger, staged, now_ms)
                applied += 1
            except CreditError:  # refused (and withdrawn): it never was credit
                continue
        return applied
