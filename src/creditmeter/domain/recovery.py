"""Audit and rebuild: the ledger is the source of truth for every account's state.

Replaying an account's events (in seq order) gives its lots, remaining credit, totals and
options. The audit compares that with Redis; the rebuild writes it back into Redis after
data loss, along with the idempotency records of the last day.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from creditmeter.constants import DEFAULT_PRIORITY, IDEMPOTENCY_TTL_S
from creditmeter.domain.ids import SESSION_TXN_PREFIX, new_id
from creditmeter.domain.lots import LotSource, burn_key
from creditmeter.domain.metering import apply_staged
from creditmeter.errors import CreditError, Rejected
from creditmeter.storage.layout import AccountKeys
from creditmeter.storage.ledger.base import CHARGE_KINDS, Event, Ledger
from creditmeter.storage.redis_store import AccountSnapshot, Call, RedisStore, lot_meta

#: A lot whose reference is a bare subscription id is a period's credits (they roll over).
_SUBSCRIPTION = re.compile(r"sub_[0-9A-Za-z]+")
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


@dataclass
class AccountState:
    """An account as its events say it is."""

    tenant: str
    account: str
    lots: dict[str, LotState] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOTALS, 0))
    #: Credits consumed out of lots (unlimited accounts consume without lots).
    lot_used: int = 0
    features: dict[str, int] = field(default_factory=dict)  # "used:<f>" / "units:<f>" -> n
    unlimited: bool | None = None
    seq: int = 0
    #: Per subscription, credits of its periods that expired unused since its last renewal
    #: (renew.lua's carry:<subscription>, the base of the next rollover).
    carry: dict[str, int] = field(default_factory=dict)

    def apply(self, e: Event) -> None:
        self.seq = max(self.seq, e.seq)
        if e.kind == "grant":
            priority = DEFAULT_PRIORITY if e.priority is None else e.priority
            self.lots[e.lot] = LotState(
                e.amount, e.amount, priority, e.expires_at_ms, e.source, e.reference, e.ts_ms
            )
            self.totals["granted"] += e.amount
            if _SUBSCRIPTION.fullmatch(e.reference) and e.source != LotSource.ROLLOVER:
                self.carry.pop(e.reference, None)  # a renewal took the carry
        elif e.kind in CHARGE_KINDS:
            self.totals["used"] += e.amount
            self.features[f"used:{e.feature}"] = (
                self.features.get(f"used:{e.feature}", 0) + e.amount
            )
            self.features[f"units:{e.feature}"] = (
                self.features.get(f"units:{e.feature}", 0) + e.units
            )
            if e.lot:
                self.lots[e.lot].remaining -= e.amount
                self.lot_used += e.amount
        elif e.kind in _REMOVALS:
            lot = self.lots[e.lot]
            lot.remaining -= e.amount
            self.totals[_REMOVALS[e.kind]] += e.amount
            if e.kind == "expire" and _SUBSCRIPTION.fullmatch(lot.reference):
                self.carry[lot.reference] = self.carry.get(lot.reference, 0) + e.amount
        elif e.kind == "options":
            self.unlimited = e.unlimited

    @property
    def balance(self) -> int:
        return sum(lot.remaining for lot in self.lots.values())

    def live_lots(self) -> dict[str, int]:
        return {lot_id: lot.remaining for lot_id, lot in self.lots.items() if lot.remaining > 0}

    def redis_fields(self) -> dict[str, str]:
        fields = {name: str(value) for name, value in self.totals.items()}
        fields.update((name, str(value)) for name, value in self.features.items())
        fields["balance"] = str(self.balance)
        fields["seq"] = str(self.seq)
        if self.unlimited is not None:
            fields["unlimited"] = "1" if self.unlimited else "0"
        fields.update((f"carry:{sub}", str(n)) for sub, n in self.carry.items() if n)
        return fields


async def replay(events: AsyncIterator[Event]) -> AsyncIterator[AccountState]:
    """Fold a scan (ordered by tenant, account, seq) into one state per account."""
    state: AccountState | None = None
    async for e in events:
        if state is None or (state.tenant, state.account) != (e.tenant, e.account):
            if state is not None:
                yield state
            state = AccountState(e.tenant, e.account)
        state.apply(e)
    if state is not None:
        yield state


@dataclass(frozen=True)
class Drift:
    tenant: str
    account: str
    problems: list[str]


def compare(state: AccountState, snap: AccountSnapshot) -> list[str]:
    """What differs between an account's ledger state and its Redis snapshot."""
    problems = []
    ledger_lots = state.live_lots()
    redis_lots = {lot.lot_id: lot.remaining for lot in snap.lots if lot.remaining > 0}
    if ledger_lots != redis_lots:
        problems.append(f"lots: ledger {ledger_lots} != redis {redis_lots}")
    identity = state.totals["granted"] - state.lot_used - state.totals["expired"]
    identity -= state.totals["removed"] + state.totals["refunded"]
    if identity != snap.int_field("balance"):
        problems.append(
            f"balance: grants - consumption - expiry - resets - refunds = {identity}"
            f" != redis {snap.int_field('balance')}"
        )
    for name in TOTALS:
        if state.totals[name] != snap.int_field(name):
            problems.append(f"{name}: ledger {state.totals[name]} != redis {snap.int_field(name)}")
    return problems


def restore_lots(state: AccountState) -> list[dict[str, str]]:
    """The account's live lots as restore.lua takes them."""
    lots = []
    for lot_id, lot in state.lots.items():
        if lot.remaining <= 0:
            continue
        key = burn_key(
            lot.priority, lot.expires_at_ms, LotSource(lot.source), lot.created_ms, lot_id
        )
        lots.append(
            {
                "id": lot_id,
                "remaining": str(lot.remaining),
                "expires_at": str(lot.expires_at_ms or 0),
                "burn_key": key,
                "meta": lot_meta(lot.amount, lot.source, lot.reference, lot.created_ms),
            }
        )
    return lots


class Recovery:
    def __init__(self, ledger: Ledger, store: RedisStore) -> None:
        self.ledger = ledger
        self.store = store

    async def audit(
        self, tenant: str | None = None, wait_s: float = 10.0
    ) -> tuple[int, list[Drift]]:
        """Check every account; returns (accounts checked, drifts).

        Works beside a running server: each account is compared at the seq its Redis
        snapshot has, waiting (up to `wait_s`) for the flusher to bring the ledger there.
        """
        seen: set[tuple[str, str]] = set()
        drifts: list[Drift] = []
        async for state in replay(self.ledger.scan(tenant)):
            seen.add((state.tenant, state.account))
            problems = await self._check(state, wait_s)
            if problems:
                drifts.append(Drift(state.tenant, state.account, problems))
        # Accounts Redis has and the ledger does not (their events never arrived).
        for (t, account), seq in (await self.store.account_seqs()).items():
            if (t, account) in seen or (tenant is not None and t != tenant):
                continue
            state = await self._caught_up(AccountState(t, account), seq, wait_s)
            seen.add((t, account))
            problems = await self._check(state, wait_s)
            if problems:
                drifts.append(Drift(t, account, problems))
        return len(seen), drifts

    async def _account_state(self, tenant: str, account: str, upto: int) -> AccountState:
        state = AccountState(tenant, account)
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
        redis_seq = snap.int_field("seq")
        if state.seq > redis_seq:
            return [f"seq: ledger has events up to {state.seq}, redis only {redis_seq}"]
        if state.seq < redis_seq:
            state = await self._caught_up(state, redis_seq, wait_s)
            snap = await self.store.snapshot(AccountKeys(state.tenant, state.account))
            if state.seq != snap.int_field("seq"):
                at = snap.int_field("seq")
                return [f"seq: redis is at {at}, ledger at {state.seq} (flusher behind or lost)"]
            state = await self._account_state(state.tenant, state.account, snap.int_field("seq"))
        return compare(state, snap)

    async def rebuild(self, now_ms: int, replace: bool = False) -> tuple[int, int, list[str]]:
        """Restore Redis from the ledger; returns (accounts, idempotency records, skipped)."""
        accounts = 0
        skipped: list[str] = []
        async for state in replay(self.ledger.scan()):
            lots = restore_lots(state)
            call = Call(now_ms=now_ms, txn=new_id("rst", now_ms))
            try:
                keys = AccountKeys(state.tenant, state.account)
                await self.store.restore(keys, call, state.redis_fields(), lots, replace)
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
