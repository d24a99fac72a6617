"""The credit line (SetAccountOptions overdraft_limit): Consume, batches, Check and call
sessions charge past the lots down to -limit, never below; the part past the lots is
debt, which the next grant or purchase repays first; a refund brings repaid debt back;
the ledger, history, audit and rebuild keep it."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import grpc
import pytest

from creditmeter import client as sdk
from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import packs_pb2 as ppb
from creditmeter.api.credits.v1 import packs_pb2_grpc as ppb_grpc
from creditmeter.constants import MAX_CREDITS
from creditmeter.domain.clock import ManualClock
from creditmeter.domain.recovery import Recovery
from creditmeter.domain.subscriptions import WEEK_MS
from creditmeter.storage.layout import AccountKeys
from creditmeter.transport import cli
from creditmeter.transport.server import App
from tests.conftest import Caller, Tenant, rid
from tests.helpers import fails, failure

#: Every test here runs on a single Redis and on a Redis Cluster (tests/conftest.py).
ON_CLUSTER = True
MINUTE = 60


async def grant(tenant: Tenant, account: str, amount: int) -> pb.GrantResponse:
    return cast(
        pb.GrantResponse,
        await tenant.admin.Grant(
            pb.GrantRequest(account_id=account, amount=amount, request_id=rid())
        ),
    )


def consume(tenant: Tenant, account: str, amount: int, **kw: Any) -> Any:
    kw.setdefault("request_id", rid())
    return tenant.meter.Consume(
        pb.ConsumeRequest(account_id=account, feature="text", amount=amount, **kw)
    )


async def options(tenant: Tenant, account: str, **kw: Any) -> pb.AccountOptions:
    kw.setdefault("request_id", rid())
    reply = await tenant.admin.SetAccountOptions(
        pb.SetAccountOptionsRequest(account_id=account, **kw)
    )
    return reply.options


async def balance(tenant: Tenant, account: str) -> pb.GetBalanceResponse:
    return cast(
        pb.GetBalanceResponse,
        await tenant.read.GetBalance(pb.GetBalanceRequest(account_id=account)),
    )


async def line(tenant: Tenant, account: str) -> tuple[int, int, int]:
    """(balance, debt, overdraft limit) as GetBalance reports them."""
    b = await balance(tenant, account)
    return b.balance, b.debt, b.overdraft_limit


async def check(tenant: Tenant, account: str, amount: int) -> pb.CheckResponse:
    return cast(
        pb.CheckResponse,
        await tenant.read.Check(pb.CheckRequest(account_id=account, feature="text", amount=amount)),
    )


@pytest.fixture
def packs(tenant: Tenant) -> dict[str, Caller]:
    stub = ppb_grpc.PacksStub(tenant.channel)
    return {role: Caller(stub, getattr(tenant, role).key) for role in ("admin", "read")}  # type: ignore[arg-type]


async def buy(packs: dict[str, Caller], account: str, credits: int) -> ppb.PurchasePackResponse:
    admin = packs["admin"]
    pack = ppb.Pack(name="Pack", credits=credits, price=ppb.Price(amount_minor=100, currency="EUR"))
    made = (await admin.CreatePack(ppb.CreatePackRequest(pack=pack, request_id=rid()))).pack
    return cast(
        ppb.PurchasePackResponse,
        await admin.PurchasePack(
            ppb.PurchasePackRequest(
                account_id=account,
                pack_id=made.pack_id,
                payment_reference=rid(),
                request_id=rid(),
            )
        ),
    )


async def refund(packs: dict[str, Caller], purchase_id: str) -> ppb.RefundPurchaseResponse:
    return cast(
        ppb.RefundPurchaseResponse,
        await packs["admin"].RefundPurchase(
            ppb.RefundPurchaseRequest(
                purchase_id=purchase_id, reason="chargeback", request_id=rid()
            )
        ),
    )


async def drained(app: App) -> None:
    assert app.flusher is not None
    for _ in range(300):
        if await app.flusher.backlog() == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the outboxes did not drain")


# --- charges down to the limit ----------------------------------------------------------
async def test_consume_goes_past_the_lots_down_to_the_limit_never_below(tenant: Tenant) -> None:
    await grant(tenant, "od", 10)
    opts = await options(tenant, "od", overdraft_limit=50)
    assert (opts.overdraft_limit, opts.unlimited) == (50, False)
    first = await consume(tenant, "od", 30)
    assert first.balance == 0 and [c.amount for c in first.charges] == [10]
    assert await line(tenant, "od") == (0, 20, 50)
    # 20 of the 50 are taken: 30 more fit, 31 do not.
    assert (await check(tenant, "od", 30)).allowed
    denied = await check(tenant, "od", 31)
    assert not denied.allowed and denied.denial.reason == "INSUFFICIENT_CREDITS"
    f = await fails(consume(tenant, "od", 31))
    assert (f.code, f.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS")
    assert f.metadata == {"balance": "0", "required": "31", "debt": "20", "overdraft_limit": "50"}
    assert await line(tenant, "od") == (0, 20, 50)  # the refusal changed nothing
    await consume(tenant, "od", 30)
    assert await line(tenant, "od") == (0, 50, 50)
    assert (await fails(consume(tenant, "od", 1))).reason == "INSUFFICIENT_CREDITS"
    usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="od"))
    assert (usage.used, usage.remaining, usage.debt, usage.overdraft_limit) == (60, 0, 50, 50)


async def test_an_account_without_a_credit_line_is_refused_as_before(tenant: Tenant) -> None:
    await grant(tenant, "plain", 5)
    f = await fails(consume(tenant, "plain", 6))
    assert f.metadata == {"balance": "5", "required": "6"}
    assert await line(tenant, "plain") == (5, 0, 0)


async def test_64_clients_racing_at_the_limit_never_pass_it(tenant: Tenant) -> None:
    await grant(tenant, "race", 100)
    await options(tenant, "race", overdraft_limit=200)
    amounts = [1 + i % 7 for i in range(64)]  # 256 in all: more than the 300 - 100 left
    amounts += [7] * 10
    results = await asyncio.gather(
        *(consume(tenant, "race", a) for a in amounts), return_exceptions=True
    )
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [failure(r) for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(accepted) + len(refused) == len(amounts)
    assert {f.reason for f in refused} == {"INSUFFICIENT_CREDITS"}
    charged = sum(r.amount for r in accepted)
    assert 300 - 7 < charged <= 300  # never past -200; what was refused could not fit
    b, debt, limit = await line(tenant, "race")
    assert (b, debt, limit) == (0, charged - 100, 200)
    usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="race"))
    assert usage.used == charged


async def test_a_batch_charges_into_debt_item_by_item(tenant: Tenant) -> None:
    await grant(tenant, "batch", 3)
    await options(tenant, "batch", overdraft_limit=5)
    reply = await tenant.meter.ConsumeBatch(
        pb.ConsumeBatchRequest(
            items=[
                pb.ConsumeRequest(account_id="batch", feature="text", amount=a, request_id=rid())
                for a in (4, 5, 1)
            ]
        )
    )
    kinds = [r.WhichOneof("outcome") for r in reply.results]
    assert kinds == ["response", "error", "response"]  # 4 (1 debt), 5 refused, 1 (2 debt)
    assert reply.results[1].error.reason == "INSUFFICIENT_CREDITS"
    assert await line(tenant, "batch") == (0, 2, 5)


async def test_unlimited_accounts_never_owe(tenant: Tenant) -> None:
    await options(tenant, "free", unlimited=True, overdraft_limit=10)
    await consume(tenant, "free", 1000)
    b = await balance(tenant, "free")
    assert (b.balance, b.unlimited, b.debt) == (-1, True, 0)


async def test_a_limit_lowered_below_the_debt_keeps_the_debt(tenant: Tenant) -> None:
    await options(tenant, "lower", overdraft_limit=20)
    await consume(tenant, "lower", 15)
    opts = await options(tenant, "lower", overdraft_limit=10)
    assert opts.overdraft_limit == 10
    assert await line(tenant, "lower") == (0, 15, 10)
    assert (await fails(consume(tenant, "lower", 1))).reason == "INSUFFICIENT_CREDITS"
    await grant(tenant, "lower", 6)  # repays 6: debt 9, one credit of the line left
    assert await line(tenant, "lower") == (0, 9, 10)
    await consume(tenant, "lower", 1)
    await options(tenant, "lower", overdraft_limit=0)  # the line removed, the debt stays
    assert await line(tenant, "lower") == (0, 10, 0)


# --- repayment ----------------------------------------------------------------------------
async def test_a_grant_repays_the_debt_first(tenant: Tenant) -> None:
    await options(tenant, "repay", overdraft_limit=100)
    await consume(tenant, "repay", 30)
    assert await line(tenant, "repay") == (0, 30, 100)
    small = await grant(tenant, "repay", 10)  # all of it repays
    assert small.balance == 0
    assert await line(tenant, "repay") == (0, 20, 100)
    assert (await balance(tenant, "repay")).lots == []
    big = await grant(tenant, "repay", 50)
    assert big.balance == 30
    b = await balance(tenant, "repay")
    assert (b.balance, b.debt) == (30, 0)
    assert [(lot.lot_id, lot.amount, lot.remaining) for lot in b.lots] == [
        (big.lot.lot_id, 50, 30)
    ]
    added = await tenant.admin.SetBalance(
        pb.SetBalanceRequest(account_id="repay", amount=5, request_id=rid())
    )
    assert added.balance == 35


async def test_a_purchase_repays_the_debt_and_its_refund_brings_it_back(
    tenant: Tenant, packs: dict[str, Caller]
) -> None:
    await options(tenant, "buyer", overdraft_limit=100)
    await consume(tenant, "buyer", 30)
    bought = await buy(packs, "buyer", 100)
    assert (bought.balance, bought.debt_repaid) == (70, 30)
    assert await line(tenant, "buyer") == (70, 0, 100)
    await consume(tenant, "buyer", 20)
    back = await refund(packs, bought.purchase.purchase_id)
    # The refund takes back what is left of the credits (50) and the debt they repaid (30)
    # comes back: 80 taken back, the 20 charged since are what was spent of it.
    assert (back.refunded_credits, back.spent_credits, back.balance) == (80, 20, 0)
    assert await line(tenant, "buyer") == (0, 30, 100)
    again = await refund(packs, bought.purchase.purchase_id)
    assert again.refunded_credits == 0
    assert await line(tenant, "buyer") == (0, 30, 100)  # not twice


async def test_refund_of_a_purchase_that_all_went_to_the_debt(
    tenant: Tenant, packs: dict[str, Caller]
) -> None:
    await options(tenant, "deep", overdraft_limit=150)
    await consume(tenant, "deep", 150)
    bought = await buy(packs, "deep", 100)
    assert (bought.balance, bought.debt_repaid) == (0, 100)
    assert await line(tenant, "deep") == (0, 50, 150)
    back = await refund(packs, bought.purchase.purchase_id)
    assert (back.refunded_credits, back.spent_credits) == (100, 0)
    assert await line(tenant, "deep") == (0, 150, 150)


async def test_a_two_step_purchase_says_what_it_repaid(
    tenant: Tenant, packs: dict[str, Caller]
) -> None:
    await options(tenant, "two", overdraft_limit=10)
    await consume(tenant, "two", 8)
    admin = packs["admin"]
    pack = ppb.Pack(name="P", credits=20, price=ppb.Price(amount_minor=100, currency="EUR"))
    made = (await admin.CreatePack(ppb.CreatePackRequest(pack=pack, request_id=rid()))).pack
    pending = await admin.CreatePurchase(
        ppb.CreatePurchaseRequest(account_id="two", pack_id=made.pack_id, request_id=rid())
    )
    request = ppb.CompletePurchaseRequest(
        purchase_id=pending.purchase.purchase_id, payment_reference=rid(), request_id=rid()
    )
    done = await admin.CompletePurchase(request)
    assert (done.balance, done.debt_repaid) == (12, 8)
    again = await admin.CompletePurchase(request)  # a retry: the same answer, nothing twice
    assert (again.balance, again.debt_repaid) == (12, 8)
    assert await line(tenant, "two") == (12, 0, 10)


# --- call sessions ------------------------------------------------------------------------
async def test_a_session_quota_is_capped_by_balance_and_overdraft(tenant: Tenant) -> None:
    await grant(tenant, "caller", 2)
    await options(tenant, "caller", overdraft_limit=3)
    started = await tenant.meter.StartSession(
        pb.StartSessionRequest(
            account_id="caller",
            feature="voice",
            session_id="s1",
            requested_seconds=10 * MINUTE,
        )
    )
    # 1 credit a minute: 2 of the balance and 3 of the credit line.
    assert (started.session.granted_seconds, started.session.final_unit) == (5 * MINUTE, True)
    assert (await fails(consume(tenant, "caller", 1))).reason == "INSUFFICIENT_CREDITS"
    ended = await tenant.meter.EndSession(
        pb.EndSessionRequest(
            account_id="caller", session_id="s1", sequence=1, used_seconds=5 * MINUTE
        )
    )
    assert ended.session.charged_amount == 5 and ended.session.uncollected_amount == 0
    assert await line(tenant, "caller") == (0, 3, 3)
    f = await fails(
        tenant.meter.StartSession(
            pb.StartSessionRequest(account_id="caller", feature="voice", session_id="s2")
        )
    )
    assert f.reason == "INSUFFICIENT_CREDITS"
    assert (f.metadata["debt"], f.metadata["overdraft_limit"]) == ("3", "3")


async def test_a_session_hold_is_collected_into_debt_when_consume_took_its_lots(
    tenant: Tenant,
) -> None:
    await grant(tenant, "held", 10)
    await options(tenant, "held", overdraft_limit=100)
    await tenant.meter.StartSession(
        pb.StartSessionRequest(
            account_id="held", feature="voice", session_id="h1", requested_seconds=10 * MINUTE
        )
    )
    await consume(tenant, "held", 5)  # past what the hold leaves: the lots first, then debt
    ended = await tenant.meter.EndSession(
        pb.EndSessionRequest(
            account_id="held", session_id="h1", sequence=1, used_seconds=10 * MINUTE
        )
    )
    assert ended.session.charged_amount == 10 and ended.session.uncollected_amount == 0
    assert await line(tenant, "held") == (0, 5, 100)


# --- idempotency and bad input ---------------------------------------------------------------
async def test_replays_are_not_counted_twice(tenant: Tenant) -> None:
    await options(tenant, "idem", overdraft_limit=10)
    one = await consume(tenant, "idem", 4, request_id="c-1")
    two = await consume(tenant, "idem", 4, request_id="c-1")
    assert one == two
    assert await line(tenant, "idem") == (0, 4, 10)
    first = await options(tenant, "idem", overdraft_limit=20, request_id="o-1")
    again = await options(tenant, "idem", overdraft_limit=20, request_id="o-1")
    assert first == again and first.overdraft_limit == 20
    f = await fails(options(tenant, "idem", overdraft_limit=30, request_id="o-1"))
    assert f.reason == "IDEMPOTENCY_KEY_REUSED"
    assert await line(tenant, "idem") == (0, 4, 20)


@pytest.mark.parametrize("limit", [-1, MAX_CREDITS + 1])
async def test_a_bad_overdraft_limit_is_invalid_and_changes_nothing(
    tenant: Tenant, limit: int
) -> None:
    await options(tenant, "bad", overdraft_limit=5)
    f = await fails(options(tenant, "bad", overdraft_limit=limit, unlimited=True))
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and "overdraft_limit" in f.violations
    b = await balance(tenant, "bad")
    assert (b.overdraft_limit, b.unlimited) == (5, False)


async def test_options_without_the_overdraft_leave_it_and_the_meter_role_cannot_set_it(
    tenant: Tenant,
) -> None:
    await options(tenant, "keep", overdraft_limit=7)
    opts = await options(tenant, "keep", time_zone="Europe/Paris")
    assert (opts.overdraft_limit, opts.time_zone) == (7, "Europe/Paris")
    f = await fails(
        tenant.meter.SetAccountOptions(
            pb.SetAccountOptionsRequest(account_id="keep", overdraft_limit=99, request_id=rid())
        )
    )
    assert f.code == grpc.StatusCode.PERMISSION_DENIED
    assert (await balance(tenant, "keep")).overdraft_limit == 7


# --- balance alerts ------------------------------------------------------------------------
async def test_alerts_fire_at_zero_and_at_the_limit(tenant: Tenant) -> None:
    await grant(tenant, "alert", 10)
    await options(tenant, "alert", overdraft_limit=20)
    call = tenant.read.WatchBalance(pb.WatchBalanceRequest(account_id="alert"))
    await call.initial_metadata()
    await consume(tenant, "alert", 15)  # 10 -> 0, debt 5
    await consume(tenant, "alert", 15)  # debt 20: the line is used up
    await grant(tenant, "alert", 30)  # repays 20, 10 spendable
    seen = []
    for _ in range(3):
        a = await asyncio.wait_for(call.read(), 2.0)
        assert a is not grpc.aio.EOF
        seen.append((a.kind, a.threshold, a.previous_balance, a.balance))
    call.cancel()
    assert seen == [
        (pb.BALANCE_ALERT_KIND_DEPLETED, 0, 10, 0),
        (pb.BALANCE_ALERT_KIND_OVERDRAFT_LIMIT_REACHED, 20, 0, 0),
        (pb.BALANCE_ALERT_KIND_TOPPED_UP, 0, 0, 10),
    ]


# --- ledger, history, audit, rebuild --------------------------------------------------------
@pytest.mark.flusher
async def test_debt_is_in_the_history_and_comes_back_with_a_rebuild(
    app: App, tenant: Tenant, packs: dict[str, Caller], clock: ManualClock, redis_client: Any
) -> None:
    await grant(tenant, "led", 10)
    await options(tenant, "led", overdraft_limit=100)
    charge = await consume(tenant, "led", 40)  # 10 from the lot, 30 debt
    bought = await buy(packs, "led", 50)  # repays 30, 20 spendable
    await consume(tenant, "led", 25)  # 20 from the lot, 5 debt
    await refund(packs, bought.purchase.purchase_id)  # nothing left; the 30 come back
    assert await line(tenant, "led") == (0, 35, 100)
    await drained(app)
    page = await tenant.read.ListTransactions(pb.ListTransactionsRequest(account_id="led"))
    rows = [(t.kind, t.amount, t.debt_incurred, t.debt_repaid) for t in page.transactions]
    assert rows == [
        (pb.TRANSACTION_KIND_DEBT, 30, 30, 0),
        (pb.TRANSACTION_KIND_CONSUME, 25, 5, 0),
        (pb.TRANSACTION_KIND_GRANT, 50, 0, 30),
        (pb.TRANSACTION_KIND_CONSUME, 40, 30, 0),
        (pb.TRANSACTION_KIND_OPTIONS, 0, 0, 0),
        (pb.TRANSACTION_KIND_GRANT, 10, 0, 0),
    ]
    consumed = page.transactions[3]
    assert consumed.transaction_id == charge.transaction_id
    assert [(c.amount) for c in consumed.lots] == [10]  # the debt is no lot
    repaid = await tenant.read.ListTransactions(
        pb.ListTransactionsRequest(
            account_id="led", filter=pb.TransactionFilter(kinds=[pb.TRANSACTION_KIND_REPAY])
        )
    )
    assert [(t.kind, t.debt_repaid) for t in repaid.transactions] == [
        (pb.TRANSACTION_KIND_GRANT, 30)
    ]
    refunds = await tenant.read.ListTransactions(
        pb.ListTransactionsRequest(
            account_id="led", filter=pb.TransactionFilter(kinds=[pb.TRANSACTION_KIND_REFUND])
        )
    )
    assert [t.debt_incurred for t in refunds.transactions] == [30]

    assert app.ledger is not None and app.metering is not None
    recovery = Recovery(app.ledger, app.metering.store)
    checked, drifts = await recovery.audit(tenant.name, 1.0, clock.now_ms())
    assert checked == 1 and drifts == []
    key = AccountKeys(tenant.name, "led").account_key
    before = redis_client.hgetall(key)
    redis_client.hset(key, "debt", "34")
    _, drifts = await recovery.audit(tenant.name, 1.0, clock.now_ms())
    assert [p for d in drifts for p in d.problems if p.startswith("credit line")]

    redis_client.flushall()
    accounts, _, skipped = await recovery.rebuild(clock.now_ms())
    assert accounts >= 1 and skipped == []
    after = redis_client.hgetall(key)
    assert {k: after.get(k) for k in ("debt", "od")} == {"debt": "35", "od": "100"}
    assert {k: v for k, v in after.items() if k.startswith("rp:")} == {
        k: v for k, v in before.items() if k.startswith("rp:")
    }
    assert await line(tenant, "led") == (0, 35, 100)
    assert (await fails(consume(tenant, "led", 66))).reason == "INSUFFICIENT_CREDITS"
    await consume(tenant, "led", 65)
    await drained(app)
    _, drifts = await recovery.audit(tenant.name, 5.0, clock.now_ms())
    assert drifts == []


@pytest.mark.flusher
async def test_a_rebuilt_account_still_brings_repaid_debt_back_on_refund(
    app: App, tenant: Tenant, packs: dict[str, Caller], clock: ManualClock, redis_client: Any
) -> None:
    await options(tenant, "later", overdraft_limit=50)
    await consume(tenant, "later", 20)
    bought = await buy(packs, "later", 30)  # repays 20, 10 spendable
    await drained(app)
    assert app.ledger is not None and app.metering is not None
    recovery = Recovery(app.ledger, app.metering.store)
    redis_client.flushall()
    await recovery.rebuild(clock.now_ms())
    assert await line(tenant, "later") == (10, 0, 50)
    back = await refund(packs, bought.purchase.purchase_id)
    assert (back.refunded_credits, back.balance) == (30, 0)
    assert await line(tenant, "later") == (0, 20, 50)
    await drained(app)
    _, drifts = await recovery.audit(tenant.name, 5.0, clock.now_ms())
    assert drifts == []


# --- SDK and CLI -----------------------------------------------------------------------------
async def test_the_sdk_sets_the_limit_and_its_refusal_carries_the_debt(
    app: App, tenant: Tenant
) -> None:
    address = f"127.0.0.1:{app.port}"
    async with sdk.AsyncClient(address, tenant.admin.key, timeout=5) as client:
        reply = await client.set_account_options("sdk", overdraft_limit=4)
        assert reply.options.overdraft_limit == 4
        await client.consume("sdk", "text", quantity=3)
        with pytest.raises(sdk.InsufficientCredits) as caught:
            await client.consume("sdk", "text", quantity=2)
    error = caught.value
    assert (error.balance, error.required, error.debt, error.overdraft_limit) == (0, 2, 3, 4)

    def sync_call() -> pb.SetAccountOptionsResponse:
        with sdk.Client(address, tenant.admin.key, timeout=5) as client:
            return client.set_account_options("sdk", overdraft_limit=6)

    assert (await asyncio.to_thread(sync_call)).options.overdraft_limit == 6
    assert await line(tenant, "sdk") == (0, 3, 6)


@pytest.mark.flusher
async def test_the_cli_sets_the_limit_and_shows_the_debt(
    app: App, tenant: Tenant, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--server", f"127.0.0.1:{app.port}", "--api-key", tenant.admin.key]
    code = await asyncio.to_thread(
        cli.main, ["account-options", "cli", "--overdraft-limit", "9", *flags]
    )
    assert code == 0 and "overdraft_limit=9" in capsys.readouterr().out
    await consume(tenant, "cli", 5)
    assert await asyncio.to_thread(cli.main, ["balance", "cli", *flags]) == 0
    assert "debt 5 of an overdraft limit of 9" in capsys.readouterr().out
    await drained(app)
    assert await asyncio.to_thread(cli.main, ["history", "cli", *flags]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if "consume" in r]
    assert len(rows) == 1 and "+5" in rows[0]


async def test_a_subscription_renewal_repays_the_debt(
    app: App, tenant: Tenant, packs: dict[str, Caller], clock: ManualClock
) -> None:
    pack = ppb.Pack(
        name="Weekly", credits=100, price=ppb.Price(amount_minor=999, currency="EUR"),
        recurrence=ppb.RECURRENCE_WEEKLY,
    )  # fmt: skip
    made = (await packs["admin"].CreatePack(ppb.CreatePackRequest(pack=pack, request_id=rid())))
    await packs["admin"].Subscribe(
        ppb.SubscribeRequest(account_id="sub", pack_id=made.pack.pack_id, request_id=rid())
    )
    await options(tenant, "sub", overdraft_limit=50)
    await consume(tenant, "sub", 130)  # the period's 100, then 30 of debt
    assert await line(tenant, "sub") == (0, 30, 50)
    assert app.subscriptions is not None
    clock.advance(WEEK_MS)
    assert await app.subscriptions.renew_due() == 1
    assert await line(tenant, "sub") == (70, 0, 50)


async def test_a_recharge_falls_due_on_the_balance_less_the_debt(tenant: Tenant) -> None:
    await tenant.admin.SetRechargePolicy(
        pb.SetRechargePolicyRequest(
            account_id="rc", policy=pb.RechargePolicy(threshold=50), request_id=rid()
        )
    )
    await grant(tenant, "rc", 100)
    await options(tenant, "rc", overdraft_limit=100)
    call = tenant.read.WatchBalance(pb.WatchBalanceRequest(account_id="rc"))
    await call.initial_metadata()
    charged = await consume(tenant, "rc", 120)  # 100 -> 0 and 20 of debt: below 50
    await grant(tenant, "rc", 40)  # repays 20, 20 spendable: still below, no second one
    await consume(tenant, "rc", 10)  # 10: no threshold watched passed, still below 50
    seen = []
    for _ in range(3):
        a = await asyncio.wait_for(call.read(), 2.0)
        assert a is not grpc.aio.EOF
        seen.append((a.kind, a.threshold, a.previous_balance, a.balance, a.transaction_id))
    with pytest.raises(TimeoutError):  # no second recharge_due
        await asyncio.wait_for(call.read(), 0.5)
    call.cancel()
    assert seen[:2] == [
        (pb.BALANCE_ALERT_KIND_DEPLETED, 0, 100, 0, charged.transaction_id),
        (pb.BALANCE_ALERT_KIND_RECHARGE_DUE, 50, 100, 0, charged.transaction_id + "d"),
    ]
    assert seen[2][:4] == (pb.BALANCE_ALERT_KIND_TOPPED_UP, 0, 0, 20)


@pytest.mark.flusher
async def test_charges_racing_repayments_keep_the_books_exact(
    app: App, tenant: Tenant, clock: ManualClock
) -> None:
    await grant(tenant, "books", 50)
    await options(tenant, "books", overdraft_limit=100)
    charges = [consume(tenant, "books", 1 + i % 7) for i in range(64)]
    grants = [grant(tenant, "books", 10) for _ in range(8)]
    results = await asyncio.gather(*charges, *grants, return_exceptions=True)
    charged_replies = results[:64]
    assert all(not isinstance(r, BaseException) for r in results[64:])
    refused = [failure(r) for r in charged_replies if isinstance(r, grpc.aio.AioRpcError)]
    assert {f.reason for f in refused} <= {"INSUFFICIENT_CREDITS"}
    charged = sum(r.amount for r in charged_replies if not isinstance(r, BaseException))
    b, debt, limit = await line(tenant, "books")
    assert b - debt == 50 + 80 - charged and 0 <= debt <= limit == 100
    assert charged <= 50 + 80 + 100
    await drained(app)
    assert app.ledger is not None and app.metering is not None
    checked, drifts = await Recovery(app.ledger, app.metering.store).audit(
        tenant.name, 5.0, clock.now_ms()
    )
    assert checked == 1 and drifts == []
