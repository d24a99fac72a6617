"""Automatic recharge (SetRechargePolicy): one recharge_due per crossing of the threshold,
recorded by the script that made the change, announced by WatchBalance, kept in the
ledger's history, and turned into exactly one pending purchase of the policy's pack."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import packs_pb2 as ppb
from creditmeter.api.credits.v1 import packs_pb2_grpc as ppb_grpc
from creditmeter.domain.clock import ManualClock
from creditmeter.domain.recharge import RechargePurchases
from creditmeter.domain.recovery import Recovery
from creditmeter.transport.server import App
from tests.conftest import Caller, Tenant, rid
from tests.helpers import fails
from tests.test_history import caught_up
from tests.test_watch import next_alert, watch

#: Every test here runs on a single Redis and on a Redis Cluster (tests/conftest.py).
ON_CLUSTER = True


async def policy(
    tenant: Tenant, threshold: int = 0, pack_id: str = "", account: str = "", **kw: Any
) -> pb.SetRechargePolicyResponse:
    reply: pb.SetRechargePolicyResponse = await tenant.admin.SetRechargePolicy(
        pb.SetRechargePolicyRequest(
            account_id=account,
            policy=pb.RechargePolicy(threshold=threshold, pack_id=pack_id),
            request_id=kw.pop("request_id", None) or rid(),
            **kw,
        )
    )
    return reply


async def grant(tenant: Tenant, account: str, amount: int) -> None:
    await tenant.admin.Grant(pb.GrantRequest(account_id=account, amount=amount, request_id=rid()))


async def consume(tenant: Tenant, account: str, amount: int, request_id: str = "") -> Any:
    return await tenant.meter.Consume(
        pb.ConsumeRequest(
            account_id=account, feature="text", amount=amount, request_id=request_id or rid()
        )
    )


def packs(tenant: Tenant) -> Caller:
    return Caller(ppb_grpc.PacksStub(tenant.channel), tenant.admin.key)


async def make_pack(tenant: Tenant, **fields: Any) -> str:
    pack = ppb.Pack(
        name=fields.pop("name", "Top-up"), credits=fields.pop("credits", 500),
        price=ppb.Price(amount_minor=499, currency="EUR"), **fields,
    )  # fmt: skip
    made = await packs(tenant).CreatePack(ppb.CreatePackRequest(pack=pack, request_id=rid()))
    return str(made.pack.pack_id)


async def purchases(tenant: Tenant, account: str) -> list[ppb.Purchase]:
    reply = await packs(tenant).ListPurchases(ppb.ListPurchasesRequest(account_id=account))
    return list(reply.purchases)


async def recharges_in_history(tenant: Tenant, account: str) -> list[pb.Transaction]:
    page = await tenant.read.ListTransactions(
        pb.ListTransactionsRequest(
            account_id=account,
            filter=pb.TransactionFilter(kinds=[pb.TRANSACTION_KIND_RECHARGE_DUE]),
        )
    )
    return list(page.transactions)


async def until_purchases(tenant: Tenant, account: str, n: int) -> list[ppb.Purchase]:
    """The account's purchases once there are `n` (the worker polls every second)."""
    for _ in range(100):
        found = await purchases(tenant, account)
        if len(found) >= n:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"{account} has {len(found)} purchases, not {n}")


# --- the crossing -----------------------------------------------------------------------
@pytest.mark.flusher
async def test_one_recharge_due_per_crossing_and_the_next_after_a_top_up(
    app: App, tenant: Tenant
) -> None:
    await policy(tenant, 50)
    await grant(tenant, "acc", 100)
    await consume(tenant, "acc", 30)  # 70: above
    crossed = await consume(tenant, "acc", 30)  # 40: crossed
    await consume(tenant, "acc", 10)  # 30: below already, no second one
    await grant(tenant, "acc", 15)  # 45: still below, and a grant never crosses down
    await consume(tenant, "acc", 5)  # 40
    await grant(tenant, "acc", 60)  # 100: back above
    again = await consume(tenant, "acc", 70)  # 30: the second crossing
    await caught_up(app)
    due = await recharges_in_history(tenant, "acc")
    assert [(t.amount, t.balance, t.pack_id) for t in due] == [(50, 30, ""), (50, 40, "")]
    # Each is a transaction of its own, after the charge that made it fall due.
    assert [t.transaction_id for t in due] == [
        again.transaction_id + "d", crossed.transaction_id + "d",
    ]  # fmt: skip
    assert [t.balance for t in due] == [again.balance, crossed.balance]
    assert await purchases(tenant, "acc") == []  # the policy names no pack


@pytest.mark.flusher
async def test_a_replayed_charge_does_not_fall_due_twice(app: App, tenant: Tenant) -> None:
    await policy(tenant, 10, account="rep")
    await grant(tenant, "rep", 20)
    first = await consume(tenant, "rep", 15, request_id="same")
    replay = await consume(tenant, "rep", 15, request_id="same")
    assert replay.transaction_id == first.transaction_id
    await caught_up(app)
    assert len(await recharges_in_history(tenant, "rep")) == 1


async def test_an_accounts_own_policy_wins_and_can_turn_recharges_off(
    tenant: Tenant,
) -> None:
    await policy(tenant, 50)
    own = await policy(tenant, 10, account="own")
    assert (own.policy.threshold, own.account_override, own.disabled) == (10, True, False)
    read = await tenant.read.GetRechargePolicy(pb.GetRechargePolicyRequest(account_id="own"))
    assert (read.policy.threshold, read.account_override) == (10, True)
    default = await tenant.read.GetRechargePolicy(pb.GetRechargePolicyRequest())
    assert default.policy.threshold == 50 and default.policy.HasField("update_time")
    other = await tenant.read.GetRechargePolicy(pb.GetRechargePolicyRequest(account_id="x"))
    assert (other.policy.threshold, other.account_override) == (50, False)

    off = await policy(tenant, account="own", disable=True)
    assert off.disabled and not off.HasField("policy")
    back = await policy(tenant, account="own", remove=True)
    assert (back.policy.threshold, back.account_override, back.disabled) == (50, False, False)
    gone = await policy(tenant, remove=True)
    assert not gone.HasField("policy")


async def test_watch_balance_sends_recharge_due(tenant: Tenant) -> None:
    pack = await make_pack(tenant)
    await policy(tenant, 100, pack, account="w")
    await grant(tenant, "w", 150)
    call = await watch(tenant.read, account_id="w")
    try:
        charged = await consume(tenant, "w", 60)
        alert = await next_alert(call)
        assert alert.kind == pb.BALANCE_ALERT_KIND_RECHARGE_DUE
        assert (alert.threshold, alert.previous_balance, alert.balance, alert.pack_id) == (
            100, 150, 90, pack)  # fmt: skip
        assert alert.transaction_id == charged.transaction_id + "d"
    finally:
        call.cancel()


async def test_a_session_hold_that_takes_the_balance_below_falls_due(tenant: Tenant) -> None:
    await tenant.admin.SetRate(
        pb.SetRateRequest(
            rate=pb.Rate(feature="call", credits_per_unit=1, unit=pb.RATE_UNIT_TIME,
                         billing_increment={"seconds": 1}),
            request_id=rid(),
        )
    )
    await policy(tenant, 100)
    await grant(tenant, "caller", 120)
    call = await watch(tenant.read, account_id="caller")
    try:
        await tenant.meter.StartSession(
            pb.StartSessionRequest(account_id="caller", feature="call", session_id="s1",
                                   requested_seconds=60)
        )
        alert = await next_alert(call)
        assert alert.kind == pb.BALANCE_ALERT_KIND_RECHARGE_DUE
        assert (alert.previous_balance, alert.balance) == (120, 60)
    finally:
        call.cancel()


async def test_an_expiry_the_sweeper_finds_falls_due_on_the_tenants_default(
    app: App, tenant: Tenant, clock: ManualClock
) -> None:
    await policy(tenant, 50)
    await grant(tenant, "exp", 40)
    await tenant.admin.Grant(
        pb.GrantRequest(account_id="exp", amount=100, valid_for={"seconds": 60}, request_id=rid())
    )
    call = await watch(tenant.read, account_id="exp")
    try:
        clock.advance(61_000)
        assert app.metering is not None
        await app.metering.sweep_due()  # no request touches the account: the sweeper
        alert = await next_alert(call)
        assert alert.kind == pb.BALANCE_ALERT_KIND_RECHARGE_DUE
        assert (alert.threshold, alert.previous_balance, alert.balance) == (50, 140, 40)
    finally:
        call.cancel()


# --- the pending purchase ---------------------------------------------------------------
@pytest.mark.flusher
async def test_64_concurrent_consumers_create_exactly_one_pending_purchase(
    app: App, tenant: Tenant
) -> None:
    pack = await make_pack(tenant, credits=500)
    await policy(tenant, 100, pack)
    await grant(tenant, "race", 200)
    # 64 charges of 2 racing: the balance goes from 200 to 72, past 100 once.
    results = await asyncio.gather(
        *(consume(tenant, "race", 2) for _ in range(64)), return_exceptions=True
    )
    assert not [r for r in results if isinstance(r, BaseException)]
    [bought] = await until_purchases(tenant, "race", 1)
    assert (bought.pack_id, bought.status) == (pack, ppb.PURCHASE_STATUS_PENDING)
    await asyncio.sleep(2.5)  # two more passes of the worker: nothing more
    assert len(await purchases(tenant, "race")) == 1
    assert len(await recharges_in_history(tenant, "race")) == 1

    # The platform takes the payment and completes it: the balance is back above.
    await packs(tenant).CompletePurchase(
        ppb.CompletePurchaseRequest(purchase_id=bought.purchase_id, payment_reference="pi_1",
                                    request_id=rid())
    )
    balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="race"))
    assert balance.balance == 72 + 500
    await consume(tenant, "race", 500)  # 72: a new crossing, a new purchase
    assert len(await until_purchases(tenant, "race", 2)) == 2


@pytest.mark.flusher
async def test_any_number_of_passes_and_servers_create_one_purchase(
    app: App, tenant: Tenant, clock: ManualClock
) -> None:
    pack = await make_pack(tenant)
    await policy(tenant, 10, pack, account="once")
    await grant(tenant, "once", 20)
    await consume(tenant, "once", 15)
    await caught_up(app)
    assert app.ledger is not None
    servers = app.ledger  # two workers on one ledger, as two servers have
    create = app_purchases(app)
    workers = [RechargePurchases(servers, create, clock) for _ in range(2)]
    await asyncio.gather(*(w.run_once() for w in workers), *(w.run_once() for w in workers))
    found = await until_purchases(tenant, "once", 1)
    assert len(found) == 1
    assert [await w.run_once() for w in workers] == [0, 0]  # nothing left to buy


def app_purchases(app: App) -> Any:
    assert app.purchases is not None
    return app.purchases.create


@pytest.mark.flusher
async def test_a_pack_no_longer_for_sale_is_logged_not_retried(
    app: App, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    pack = await make_pack(tenant)
    await policy(tenant, 10, pack, account="arch")
    await packs(tenant).DeletePack(ppb.DeletePackRequest(pack_id=pack, request_id=rid()))
    await grant(tenant, "arch", 20)
    await consume(tenant, "arch", 15)
    await caught_up(app)
    for _ in range(50):
        if "no pending purchase of pack" in caplog.text:
            break
        await asyncio.sleep(0.1)
    assert "no pending purchase of pack" in caplog.text
    assert await purchases(tenant, "arch") == []
    assert len(await recharges_in_history(tenant, "arch")) == 1  # the crossing is kept


# --- the ledger ---------------------------------------------------------------------------
@pytest.mark.flusher
async def test_own_policies_are_in_the_history_and_come_back_with_a_rebuild(
    app: App, tenant: Tenant, clock: ManualClock, redis_client: Any
) -> None:
    pack = await make_pack(tenant)
    await policy(tenant, 30, pack, account="kept")
    await policy(tenant, account="off", disable=True)
    await policy(tenant, 5, account="gone")
    await policy(tenant, account="gone", remove=True)
    await caught_up(app)
    page = await tenant.read.ListTransactions(
        pb.ListTransactionsRequest(
            account_id="kept",
            filter=pb.TransactionFilter(kinds=[pb.TRANSACTION_KIND_RECHARGE_POLICY]),
        )
    )
    assert [(t.amount, t.pack_id) for t in page.transactions] == [(30, pack)]
    assert app.ledger is not None and app.metering is not None and app.live is not None
    recovery = Recovery(app.ledger, app.metering.store, app.live.limits.book)
    checked, drifts = await recovery.audit(tenant.name, 1.0, clock.now_ms())
    assert checked == 3 and drifts == []

    redis_client.flushall()
    await recovery.rebuild(clock.now_ms())
    for account, expected in (("kept", (30, pack, True, False)), ("off", (0, "", True, True)),
                              ("gone", (0, "", False, False))):  # fmt: skip
        got = await tenant.read.GetRechargePolicy(pb.GetRechargePolicyRequest(account_id=account))
        assert (got.policy.threshold, got.policy.pack_id, got.account_override,
                got.disabled) == expected, account  # fmt: skip
    checked, drifts = await recovery.audit(tenant.name, 1.0, clock.now_ms())
    assert drifts == []


# --- the RPCs -------------------------------------------------------------------------------
async def test_set_recharge_policy_validates_and_changes_nothing(tenant: Tenant) -> None:
    recurring = await make_pack(tenant, recurrence=ppb.RECURRENCE_MONTHLY)
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({"threshold": 0}, {"policy.threshold"}),
        ({"threshold": 2**53}, {"policy.threshold"}),
        ({"threshold": 5, "pack_id": "pack_nope"}, {"policy.pack_id"}),
        ({"threshold": 5, "pack_id": recurring}, {"policy.pack_id"}),
        ({"disable": True}, {"disable"}),  # the tenant's default cannot be disabled
        ({"account": "a", "disable": True, "remove": True}, {"disable"}),
        ({"account": "has space", "threshold": 5}, {"account_id"}),
    ]
    for kw, fields in cases:
        f = await fails(policy(tenant, **kw))
        assert f.code == grpc.StatusCode.INVALID_ARGUMENT, kw
        assert set(f.violations) == fields, (kw, f.violations)
    got = await tenant.read.GetRechargePolicy(pb.GetRechargePolicyRequest())
    assert not got.HasField("policy")
    f = await fails(tenant.meter.SetRechargePolicy(pb.SetRechargePolicyRequest(request_id=rid())))
    assert f.code == grpc.StatusCode.PERMISSION_DENIED


async def test_set_recharge_policy_is_idempotent(tenant: Tenant) -> None:
    first = await policy(tenant, 40, account="idem", request_id="r1")
    again = await policy(tenant, 40, account="idem", request_id="r1")
    assert first == again
    f = await fails(policy(tenant, 41, account="idem", request_id="r1"))
    assert f.reason == "IDEMPOTENCY_KEY_REUSED"
    tenant_first = await policy(tenant, 40, request_id="t1")
    tenant_again = await policy(tenant, 40, request_id="t1")
    assert tenant_first == tenant_again
    f = await fails(policy(tenant, 41, request_id="t1"))
    assert f.reason == "IDEMPOTENCY_KEY_REUSED"
