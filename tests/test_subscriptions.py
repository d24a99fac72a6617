"""Recurring packs: one grant per period, on time, exactly once across server processes,
unused credit expiring at period end with a capped rollover."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from creditmeter.api.credits.v1 import credits_pb2 as cpb
from creditmeter.api.credits.v1 import packs_pb2 as pb
from creditmeter.api.credits.v1 import packs_pb2_grpc as pb_grpc
from creditmeter.domain.clock import ManualClock
from creditmeter.domain.subscriptions import WEEK_MS, period_start
from creditmeter.storage.layout import AccountKeys
from creditmeter.transport.server import App
from tests.conftest import Caller, Tenant, another_server, rid
from tests.helpers import fails

#: Every test here runs on a single Redis and on a Redis Cluster (tests/conftest.py).
ON_CLUSTER = True


@pytest.fixture
def packs(tenant: Tenant) -> Caller:
    return Caller(pb_grpc.PacksStub(tenant.channel), tenant.admin.key)


async def weekly(packs: Caller, **fields: Any) -> pb.Pack:
    pack = pb.Pack(
        name="Weekly", credits=fields.pop("credits", 100),
        price=pb.Price(amount_minor=999, currency="EUR"), recurrence=pb.RECURRENCE_WEEKLY,
        **fields,
    )  # fmt: skip
    return (await packs.CreatePack(pb.CreatePackRequest(pack=pack, request_id=rid()))).pack  # type: ignore[no-any-return]


async def lots(t: Tenant, account: str) -> list[tuple[int, int]]:
    b = await t.read.GetBalance(cpb.GetBalanceRequest(account_id=account))
    return [(lot.amount, lot.remaining) for lot in b.lots]


def test_period_arithmetic() -> None:
    jan31 = 1_769_817_600_123  # 2026-01-31T00:00:00.123Z
    assert period_start(jan31, "monthly", 1) == 1_772_236_800_123  # 2026-02-28
    assert period_start(jan31, "monthly", 2) == 1_774_915_200_123  # 2026-03-31
    assert period_start(jan31, "yearly", 1) == 1_801_353_600_123  # 2027-01-31
    assert period_start(jan31, "weekly", 3) == jan31 + 3 * WEEK_MS


async def test_periods_expiry_and_capped_rollover(
    app: App, tenant: Tenant, packs: Caller, clock: ManualClock
) -> None:
    pack = await weekly(packs, credits=100, rollover_cap=30)
    sub = (
        await packs.Subscribe(
            pb.SubscribeRequest(account_id="s", pack_id=pack.pack_id, request_id=rid())
        )
    ).subscription
    assert sub.periods_granted == 1 and sub.status == pb.SUBSCRIPTION_STATUS_ACTIVE
    assert await lots(tenant, "s") == [(100, 100)]
    await tenant.meter.Consume(
        cpb.ConsumeRequest(account_id="s", feature="text", quantity=40, request_id=rid())
    )
    assert app.subscriptions is not None
    assert await app.subscriptions.renew_due() == 0  # nothing due yet
    clock.advance(WEEK_MS)
    assert await app.subscriptions.renew_due() == 1
    # 60 were left unused: they expired at the period's end, 30 (the cap) carried over.
    assert sorted(await lots(tenant, "s")) == [(30, 30), (100, 100)]
    usage = await tenant.read.GetUsage(cpb.GetUsageRequest(account_id="s"))
    assert (usage.expired, usage.total, usage.remaining) == (60, 230, 130)
    clock.advance(WEEK_MS)
    assert await app.subscriptions.renew_due() == 1
    assert sorted(await lots(tenant, "s")) == [(30, 30), (100, 100)]  # 130 unused: cap 30
    got = (
        await packs.GetSubscription(pb.GetSubscriptionRequest(subscription_id=sub.subscription_id))
    ).subscription
    assert got.periods_granted == 3


async def test_cancel_lets_the_current_period_run_out(
    app: App, tenant: Tenant, packs: Caller, clock: ManualClock
) -> None:
    pack = await weekly(packs, credits=10)
    sub = (
        await packs.Subscribe(
            pb.SubscribeRequest(account_id="c", pack_id=pack.pack_id, request_id=rid())
        )
    ).subscription
    cancel = pb.CancelSubscriptionRequest(subscription_id=sub.subscription_id, request_id=rid())
    cancelled = (await packs.CancelSubscription(cancel)).subscription
    assert cancelled.status == pb.SUBSCRIPTION_STATUS_CANCELLED
    assert (await packs.CancelSubscription(cancel)).subscription.status == cancelled.status
    assert await lots(tenant, "c") == [(10, 10)]  # the current period still runs
    clock.advance(2 * WEEK_MS)
    assert app.subscriptions is not None
    assert await app.subscriptions.renew_due() == 0
    assert await lots(tenant, "c") == []
    f = await fails(packs.GetSubscription(pb.GetSubscriptionRequest(subscription_id="sub_nope")))
    assert f.reason == "SUBSCRIPTION_NOT_FOUND"


@pytest.fixture
async def second_app(app: App) -> AsyncIterator[App]:
    """Another server process on the same Redis, config store and ledger."""
    async with another_server(app, app.settings.data_dir, renew_interval_s=0.05) as other:
        yield other


async def test_three_periods_with_two_processes_grant_exactly_three_times(
    app: App, second_app: App, tenant: Tenant, packs: Caller, clock: ManualClock
) -> None:
    pack = await weekly(packs, credits=7)
    sub = (
        await packs.Subscribe(
            pb.SubscribeRequest(account_id="two", pack_id=pack.pack_id, request_id=rid())
        )
    ).subscription
    assert app.subscriptions is not None and second_app.subscriptions is not None
    for _ in range(3):
        clock.advance(WEEK_MS)
        # Both processes' schedulers race (second_app's loop runs every 50 ms too).
        counts = await asyncio.gather(
            *(
                s.renew_due()
                for s in (app.subscriptions, second_app.subscriptions)
                for _ in range(3)
            )
        )
        assert sum(counts) <= 1
        await asyncio.sleep(0.1)
    got = (
        await packs.GetSubscription(pb.GetSubscriptionRequest(subscription_id=sub.subscription_id))
    ).subscription
    assert got.periods_granted == 4  # the first at Subscribe, then three periods
    usage = await tenant.read.GetUsage(cpb.GetUsageRequest(account_id="two"))
    assert usage.total == 4 * 7 and usage.expired == 3 * 7 and usage.remaining == 7


async def test_catches_up_after_downtime_without_double_grants(
    app: App, tenant: Tenant, packs: Caller, clock: ManualClock
) -> None:
    pack = await weekly(packs, credits=5, rollover_cap=100)
    await packs.Subscribe(
        pb.SubscribeRequest(account_id="late", pack_id=pack.pack_id, request_id=rid())
    )
    clock.advance(3 * WEEK_MS + 1)
    assert app.subscriptions is not None
    assert await app.subscriptions.renew_due() == 3
    assert await app.subscriptions.renew_due() == 0
    usage = await tenant.read.GetUsage(cpb.GetUsageRequest(account_id="late"))
    assert usage.total - usage.expired == usage.remaining
    assert usage.remaining == 5 * 4  # unused periods rolled over (cap 100)


@pytest.mark.flusher
async def test_rollover_survives_a_redis_rebuild(
    app: App, tenant: Tenant, packs: Caller, clock: ManualClock, redis_client: Any
) -> None:
    """The carry of a period that expired before Redis was lost comes back from the ledger."""
    from creditmeter.domain.recovery import Recovery

    pack = await weekly(packs, credits=100, rollover_cap=30)
    await packs.Subscribe(
        pb.SubscribeRequest(account_id="rb", pack_id=pack.pack_id, request_id=rid())
    )
    await tenant.meter.Consume(
        cpb.ConsumeRequest(account_id="rb", feature="text", quantity=40, request_id=rid())
    )
    clock.advance(WEEK_MS)
    assert app.metering is not None and app.flusher is not None and app.ledger is not None
    assert await app.metering.sweep_due() >= 1  # period 0 expires with 60 unused
    for _ in range(200):
        if await app.flusher.backlog() == 0:
            break
        await asyncio.sleep(0.02)
    redis_client.flushall()
    await Recovery(app.ledger, app.metering.store).rebuild(clock.now_ms())
    assert app.subscriptions is not None
    assert await app.subscriptions.renew_due() == 1
    assert sorted(await lots(tenant, "rb")) == [(30, 30), (100, 100)]


@pytest.mark.flusher
async def test_a_lot_rolls_over_by_its_flag_not_its_reference(
    app: App, tenant: Tenant, packs: Caller, clock: ManualClock, redis_client: Any
) -> None:
    """A period's lot and its rollover lot roll over, its bonus lot does not, though all three
    name the subscription: their grant events say so, audit and rebuild follow them."""
    from creditmeter.domain.recovery import Recovery

    pack = await weekly(packs, credits=100, bonus_credits=20, rollover_cap=1000)
    sub = (
        await packs.Subscribe(
            pb.SubscribeRequest(account_id="fl", pack_id=pack.pack_id, request_id=rid())
        )
    ).subscription
    b = await tenant.read.GetBalance(cpb.GetBalanceRequest(account_id="fl"))
    assert {lot.reference for lot in b.lots} == {sub.subscription_id}
    clock.advance(WEEK_MS)
    assert app.subscriptions is not None
    assert await app.subscriptions.renew_due() == 1
    # Period 0's 100 carried over; its bonus expired.
    assert sorted(await lots(tenant, "fl")) == [(20, 20), (100, 100), (100, 100)]
    assert app.ledger is not None and app.metering is not None
    recovery = Recovery(app.ledger, app.metering.store)
    checked, drifts = await recovery.audit(tenant.name, 5.0)
    assert checked == 1 and drifts == []
    grants = sorted(
        [(e.source, e.rolls_over) async for e in app.ledger.scan(tenant.name, "fl")
         if e.kind == "grant"]
    )  # fmt: skip
    assert grants == [
        ("bonus", False), ("bonus", False), ("purchase", True), ("purchase", True),
        ("rollover", True),
    ]  # fmt: skip
    # Rebuilt from the ledger, the lots still say so: period 1's 100 and its rollover's 100
    # carry into period 2, not its bonus.
    redis_client.flushall()
    await recovery.rebuild(clock.now_ms())
    clock.advance(WEEK_MS)
    assert await app.subscriptions.renew_due() == 1
    assert sorted(await lots(tenant, "fl")) == [(20, 20), (100, 100), (200, 200)]


async def test_a_period_lot_of_0_1_0_rolls_over(
    app: App, tenant: Tenant, packs: Caller, clock: ManualClock, redis_client: Any
) -> None:
    """A lot whose metadata 0.1.0 wrote (its long form, with no flag) rolls over when its
    reference is a bare subscription id, as it did then."""
    pack = await weekly(packs, credits=100, rollover_cap=30)
    sub = (
        await packs.Subscribe(
            pb.SubscribeRequest(account_id="old", pack_id=pack.pack_id, request_id=rid())
        )
    ).subscription
    key = AccountKeys(tenant.name, "old").account_key
    fields = redis_client.hgetall(key)
    [(meta_field, meta)] = [(f, json.loads(v)) for f, v in fields.items() if f.startswith("m:")]
    [burn] = [f[2:] for f in fields if f.startswith("q:")]
    assert meta["r"] == sub.subscription_id and meta.pop("o") == "1"
    redis_client.hset(key, meta_field, json.dumps({
        "amount": meta["a"], "priority": str(pack.priority), "expires_at": fields["next_expiry"],
        "source": meta["s"], "reference": meta["r"], "created": meta["c"], "burn_key": burn,
    }))  # fmt: skip
    await tenant.meter.Consume(
        cpb.ConsumeRequest(account_id="old", feature="text", quantity=40, request_id=rid())
    )
    clock.advance(WEEK_MS)
    assert app.subscriptions is not None
    assert await app.subscriptions.renew_due() == 1
    assert sorted(await lots(tenant, "old")) == [(30, 30), (100, 100)]
