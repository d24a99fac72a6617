"""Subscriptions to recurring packs: one grant per period, exactly once.

Period k of a subscription starts k recurrences after its anchor (calendar months and
years in UTC, the anchor's day clamped to the month's length). A period is claimed in the
ledger by a compare-and-set on the count of periods granted, in the same transaction that
stages its grants, so however many server processes run the scheduler, and however late
it runs after downtime, each period is granted once. Its credits expire at the period's
end; up to the pack's rollover cap of what expired unused carries into the next period
(renew.lua).
"""

from __future__ import annotations

import calendar
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from creditmeter.domain.backpressure import Backpressure
from creditmeter.domain.clock import Clock
from creditmeter.domain.ids import fingerprint, new_id
from creditmeter.domain.lots import LotSource
from creditmeter.domain.model import SubscriptionRecord
from creditmeter.domain.packs import Catalog, Recurrence, Sale, snapshot
from creditmeter.domain.staging import Operation, apply_staged
from creditmeter.domain.validation import Violations
from creditmeter.errors import (
    CreditError,
    IdempotencyKeyReused,
    SubscriptionNotFound,
    applied,
)
from creditmeter.storage.ledger.base import Commerce, StagedGrant
from creditmeter.storage.redis_store import RedisStore

log = logging.getLogger(__name__)

#: Subscriptions renewed per scheduler round (the rest wait for the next round).
RENEW_BATCH = 100
WEEK_MS = 7 * 86_400_000


def period_start(anchor_ms: int, recurrence: str, k: int) -> int:
    """When period k starts (ms), k recurrences after the anchor."""
    if recurrence == Recurrence.WEEKLY:
        return anchor_ms + k * WEEK_MS
    if recurrence not in (Recurrence.MONTHLY, Recurrence.YEARLY):
        raise ValueError(f"not a recurring period: {recurrence!r}")
    seconds, ms = divmod(anchor_ms, 1000)
    anchor = datetime.fromtimestamp(seconds, UTC)
    total = anchor.month - 1 + k * (12 if recurrence == Recurrence.YEARLY else 1)
    year, month = anchor.year + total // 12, total % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return int(anchor.replace(year=year, month=month, day=day).timestamp()) * 1000 + ms


@dataclass(frozen=True)
class SubscriptionView:
    sub: SubscriptionRecord
    current_start_ms: int
    current_end_ms: int


class SubscriptionStatus(StrEnum):
    ACTIVE = "active"
    CANCELLED = "cancelled"


def view(sub: SubscriptionRecord) -> SubscriptionView:
    current = max(sub.periods_granted - 1, 0)
    return SubscriptionView(
        sub,
        period_start(sub.anchor_ms, sub.recurrence, current),
        period_start(sub.anchor_ms, sub.recurrence, current + 1),
    )


def period_grants(sub: SubscriptionRecord, k: int) -> list[StagedGrant]:
    """The staged grants of period k. Every id derives from (subscription, k), so staging
    or applying them again is a no-op."""
    start = period_start(sub.anchor_ms, sub.recurrence, k)
    end = period_start(sub.anchor_ms, sub.recurrence, k + 1)
    parts = [("credits", sub.credits, LotSource.PURCHASE, sub.subscription_id,
              Operation.renew(sub.rollover_cap))]  # fmt: skip
    if sub.bonus_credits:
        # A plain grant: the bonus does not roll over (only renew's lots do, their flag says).
        parts.append(("bonus", sub.bonus_credits, LotSource.BONUS, sub.subscription_id,
                      Operation.grant()))  # fmt: skip
    return [
        StagedGrant(
            tenant=sub.tenant,
            account=sub.account,
            request_id=f"{sub.subscription_id}:p{k}:{part}",
            fingerprint=fingerprint("Period", {"sub": sub.subscription_id, "k": k, "part": part}),
            txn=f"txn_{sub.subscription_id}_p{k}_{part}",
            lot_id=f"lot_{sub.subscription_id.removeprefix('sub_')}p{k}{part[0]}",
            amount=amount,
            priority=sub.priority,
            expires_at_ms=end,
            source=str(source),
            reference=reference,
            created_ms=start,
            operation=operation.encode(),
        )
        for part, amount, source, reference, operation in parts
    ]


class Subscriptions:
    def __init__(
        self,
        catalog: Catalog,
        ledger: Commerce,
        store: RedisStore,
        clock: Clock,
        gate: Backpressure,
    ) -> None:
        self.catalog = catalog
        self.ledger = ledger
        self.store = store
        self.clock = clock
        self.gate = gate

    async def subscribe(
        self, tenant: str, account: str, pack_id: str, request_id: str
    ) -> SubscriptionView:
        """Subscribe and grant the first period at once."""
        v = Violations()
        v.account_id(account)
        v.request_id(request_id)
        if not pack_id:
            v.add("pack_id", "required")
        v.raise_if_any()
        pack = await self.catalog.for_sale(tenant, pack_id, Sale.SUBSCRIPTION, v)
        v.raise_if_any()
        self.gate.check()
        now = self.clock.now_ms()
        fp = fingerprint("Subscribe", {"account": account, "pack": pack_id})
        record = SubscriptionRecord(
            subscription_id=new_id("sub", now),
            tenant=tenant,
            account=account,
            status=SubscriptionStatus.ACTIVE,
            recurrence=pack.recurrence,
            rollover_cap=pack.rollover_cap,
            priority=pack.priority,
            anchor_ms=now,
            periods_granted=0,
            next_period_ms=now,
            request_id=request_id,
            fingerprint=fp,
            create_ms=now,
            **snapshot(pack),
        )
        stored, inserted = await self.ledger.create_subscription(record)
        if not inserted and stored.fingerprint != fp:
            raise IdempotencyKeyReused(
                "request_id was already used with different parameters", {"request_id": request_id}
            )
        await self.renew(stored, now)
        return await self.get(tenant, stored.subscription_id)

    async def get(self, tenant: str, subscription_id: str) -> SubscriptionView:
        v = Violations()
        if not subscription_id:
            v.add("subscription_id", "required")
        v.raise_if_any()
        sub = await self.ledger.get_subscription(tenant, subscription_id)
        if sub is None:
            raise SubscriptionNotFound(
                f"no subscription {subscription_id!r}", {"subscription_id": subscription_id}
            )
        return view(sub)

    async def cancel(self, tenant: str, subscription_id: str, request_id: str) -> SubscriptionView:
        v = Violations()
        v.request_id(request_id)
        v.raise_if_any()
        await self.get(tenant, subscription_id)
        after = await self.ledger.cancel_subscription(tenant, subscription_id, self.clock.now_ms())
        assert after is not None
        return view(after)

    async def renew(self, sub: SubscriptionRecord, now_ms: int) -> int:
        """Grant every period of `sub` that has started and not been granted, oldest first
        (catching up after downtime). Returns periods this call granted."""
        granted = 0
        k = sub.periods_granted
        while (
            sub.status == SubscriptionStatus.ACTIVE
            and period_start(sub.anchor_ms, sub.recurrence, k) <= now_ms
        ):
            grants = period_grants(sub, k)
            following = period_start(sub.anchor_ms, sub.recurrence, k + 1)
            if await self.ledger.claim_period(
                sub.tenant, sub.subscription_id, k, following, grants
            ):
                granted += 1
            else:
                latest = await self.ledger.get_subscription(sub.tenant, sub.subscription_id)
                if latest is None or latest.periods_granted <= k:
                    return granted  # not claimed by anyone (cancelled meanwhile): grant nothing
                sub = latest
            # Claimed here or by another process: apply (idempotently) either way, so a
            # process that died between claim and apply is made good.
            for grant in grants:
                staged = await applied(self.ledger.stage_grant(grant))
                await apply_staged(self.store, self.ledger, staged, now_ms)
            k += 1
        return granted

    async def renew_due(self) -> int:
        """The scheduler's round: renew every subscription whose next period has started."""
        now = self.clock.now_ms()
        renewed = 0
        for sub in await self.ledger.due_subscriptions(now, RENEW_BATCH):
            try:
                renewed += await self.renew(sub, now)
            except CreditError as error:  # e.g. the balance limit: the next round retries
                log.warning("renewing %s failed: %s", sub.subscription_id, error)
        return renewed
