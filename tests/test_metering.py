"""The metering rules through the gRPC API: burn-down order, expiry, rates, usage, resets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import redis
from google.protobuf import duration_pb2

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.domain.clock import ManualClock
from creditmeter.domain.lots import LotSource, burn_key
from creditmeter.storage import scripts
from creditmeter.storage.entries import events as entry_events
from creditmeter.storage.layout import BURN_KEY_EXPIRY, BURN_KEY_LOT_OFFSET, bucket_of, outbox_key
from creditmeter.transport.convert import timestamp
from creditmeter.transport.server import App
from tests.conftest import Tenant, another_server, rid
from tests.helpers import fails

#: Every test here runs on a single Redis and on a Redis Cluster (tests/conftest.py).
ON_CLUSTER = True

HOUR_MS = 3_600_000


async def grant(t: Tenant, account: str, amount: int, **kw: Any) -> pb.GrantResponse:
    return await t.admin.Grant(
        pb.GrantRequest(account_id=account, amount=amount, request_id=rid(), **kw)
    )


async def consume(t: Tenant, account: str, **kw: Any) -> pb.ConsumeResponse:
    kw.setdefault("feature", "text")
    return await t.meter.Consume(pb.ConsumeRequest(account_id=account, request_id=rid(), **kw))


def events(r: redis.Redis, tenant: str, account: str) -> list[dict[str, str]]:
    entries = r.xrange(outbox_key(bucket_of(tenant, account)))
    return [
        f
        for _, fields in entries
        for f in entry_events(fields)
        if f["tenant"] == tenant and f["account"] == account and f["kind"] != "request"
    ]


async def test_burn_down_order(tenant: Tenant, clock: ManualClock) -> None:
    """priority asc, then soonest expiry (never last), then promotional first, then oldest."""
    now = clock.now_ms()
    late = timestamp(now + 48 * HOUR_MS)
    soon = timestamp(now + 24 * HOUR_MS)
    # Granted in an order that differs from the burn order.
    never_old = await grant(tenant, "u", 10)
    clock.advance(1)
    prio_high = await grant(tenant, "u", 10, priority=90, expires_at=soon)
    clock.advance(1)
    late_purchase = await grant(tenant, "u", 10, expires_at=late, source=pb.LOT_SOURCE_PURCHASE)
    clock.advance(1)
    late_bonus = await grant(tenant, "u", 10, expires_at=late, source=pb.LOT_SOURCE_BONUS)
    clock.advance(1)
    soon_manual = await grant(tenant, "u", 10, expires_at=soon)
    clock.advance(1)
    never_new = await grant(tenant, "u", 10)
    clock.advance(1)
    prio_low = await grant(tenant, "u", 10, priority=5)

    expected = [prio_low, soon_manual, late_bonus, late_purchase, never_old, never_new, prio_high]
    balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="u"))
    assert [lot.lot_id for lot in balance.lots] == [g.lot.lot_id for g in expected]
    assert balance.balance == 70

    # One charge spanning three lots records how much came from each, in order.
    c = await consume(tenant, "u", amount=25)
    assert [(ch.lot_id, ch.amount) for ch in c.charges] == [
        (prio_low.lot.lot_id, 10),
        (soon_manual.lot.lot_id, 10),
        (late_bonus.lot.lot_id, 5),
    ]
    assert c.balance == 45
    # Then the rest, lot by lot, in the same order.
    order = []
    for _ in range(45):
        order.append((await consume(tenant, "u")).charges[0].lot_id)
    seen = list(dict.fromkeys(order))
    assert seen == [g.lot.lot_id for g in expected[2:]]
    assert (await fails(consume(tenant, "u"))).reason == "INSUFFICIENT_CREDITS"


async def test_expired_lot_is_never_spent_and_its_expiry_recorded(
    tenant: Tenant, clock: ManualClock, redis_client: redis.Redis
) -> None:
    expiring = await grant(tenant, "u", 100, valid_for=duration_pb2.Duration(seconds=60))
    keeper = await grant(tenant, "u", 5)
    assert (await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="u"))).balance == 105

    clock.advance(60_000)  # expiry is exclusive: at expires_at the credit is gone
    # Before any sweep or write: the read already excludes it.
    balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="u"))
    assert balance.balance == 5
    assert [lot.lot_id for lot in balance.lots] == [keeper.lot.lot_id]

    failure = await fails(consume(tenant, "u", amount=6))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "INSUFFICIENT_CREDITS"
    assert failure.metadata == {"balance": "5", "required": "6"}

    c = await consume(tenant, "u", amount=5)
    assert [(ch.lot_id, ch.amount) for ch in c.charges] == [(keeper.lot.lot_id, 5)]
    kinds = [(e["kind"], e["lot"], e["amount"]) for e in events(redis_client, tenant.name, "u")]
    assert ("expire", expiring.lot.lot_id, "100") in kinds
    assert kinds.count(("expire", expiring.lot.lot_id, "100")) == 1
    usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="u"))
    assert (usage.total, usage.used, usage.expired, usage.remaining) == (105, 5, 100, 0)


async def test_sweeper_records_expiry_without_any_request(
    app: App, tenant: Tenant, clock: ManualClock, redis_client: redis.Redis
) -> None:
    lot = await grant(tenant, "idle", 7, valid_for=duration_pb2.Duration(seconds=10))
    clock.advance(10_001)
    assert app.metering is not None
    assert await app.metering.sweep_due() >= 1
    expiries = [e for e in events(redis_client, tenant.name, "idle") if e["kind"] == "expire"]
    assert [(e["lot"], e["amount"], e["balance"]) for e in expiries] == [(lot.lot.lot_id, "7", "0")]
    # A second sweep finds nothing more to do for this account.
    await app.metering.sweep_due()
    assert len([e for e in events(redis_client, tenant.name, "idle") if e["kind"] == "expire"]) == 1


async def test_racing_sweepers_of_two_servers_record_each_expiry_once(
    app: App,
    tenant: Tenant,
    clock: ManualClock,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """Every server sweeps every bucket's expiry index: the sweep script expires what is due
    atomically, so servers racing over the same accounts record each expiry once."""
    lots = [await grant(tenant, f"race{i}", 5, valid_for=duration_pb2.Duration(seconds=10))
            for i in range(6)]  # fmt: skip
    async with another_server(app, tmp_path / "second") as second:
        assert app.metering is not None and second.metering is not None
        clock.advance(10_001)
        swept = await asyncio.gather(
            *(m.sweep_due() for m in (app.metering, second.metering, app.metering, second.metering))
        )
    assert sum(swept) >= 6
    for i, lot in enumerate(lots):
        expiries = [
            e for e in events(redis_client, tenant.name, f"race{i}") if e["kind"] == "expire"
        ]
        assert [(e["lot"], e["amount"]) for e in expiries] == [(lot.lot.lot_id, "5")]


async def test_time_features_round_up_per_billing_increment(tenant: Tenant) -> None:
    await grant(tenant, "u", 1000)
    await tenant.admin.SetRate(
        pb.SetRateRequest(rate=pb.Rate(feature="voice", credits_per_unit=3), request_id=rid())
    )
    await tenant.admin.SetRate(
        pb.SetRateRequest(
            rate=pb.Rate(
                feature="video",
                credits_per_unit=10,
                billing_increment=duration_pb2.Duration(seconds=30),
            ),
            request_id=rid(),
        )
    )
    cases = [
        ("voice", 1, 1),
        ("voice", 60, 1),
        ("voice", 61, 2),
        ("voice", 3600, 60),
        ("video", 30, 1),
        ("video", 31, 2),
        ("text", 7, 7),
    ]
    for feature, seconds, units in cases:
        c = await consume(tenant, "u", feature=feature, quantity=seconds)
        rate = {"voice": 3, "video": 10, "text": 1}[feature]
        assert (c.units, c.amount) == (units, units * rate), (feature, seconds)
    usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="u"))
    per = {f.feature: (f.credits, f.units) for f in usage.features}
    assert per == {"voice": (3 * 64, 64), "video": (30, 3), "text": (7, 7)}
    assert usage.used == 192 + 30 + 7 and usage.remaining == 1000 - usage.used


async def test_custom_feature_and_explicit_amount(tenant: Tenant) -> None:
    await grant(tenant, "u", 100)
    assert (await fails(consume(tenant, "u", feature="sticker"))).violations.keys() == {"feature"}
    r = await tenant.admin.SetRate(
        pb.SetRateRequest(rate=pb.Rate(feature="sticker", credits_per_unit=4), request_id=rid())
    )
    assert r.rate.unit == pb.RATE_UNIT_COUNT and not r.rate.builtin
    c = await consume(tenant, "u", feature="sticker", quantity=2)
    assert (c.amount, c.units) == (8, 2)
    c = await consume(tenant, "u", feature="sticker", quantity=2, amount=13)
    assert (c.amount, c.units, c.balance) == (13, 2, 79)
    rates = await tenant.read.ListRates(pb.ListRatesRequest())
    assert [r.feature for r in rates.rates] == ["sticker", "text", "video", "voice"]


async def test_unlimited_accounts(tenant: Tenant) -> None:
    await tenant.admin.SetAccountOptions(
        pb.SetAccountOptionsRequest(account_id="vip", unlimited=True, request_id=rid())
    )
    for _ in range(3):
        c = await consume(tenant, "vip", quantity=1000)
        assert c.balance == -1 and not c.charges
    usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="vip"))
    assert (usage.total, usage.used, usage.remaining, usage.unlimited) == (-1, 3000, -1, True)
    # Back to limited: nothing was ever granted, so nothing is spendable.
    await tenant.admin.SetAccountOptions(
        pb.SetAccountOptionsRequest(account_id="vip", unlimited=False, request_id=rid())
    )
    assert (await fails(consume(tenant, "vip"))).reason == "INSUFFICIENT_CREDITS"


async def test_unlimited_accounts_answer_minus_one_everywhere(tenant: Tenant) -> None:
    """Unlimited reads as -1 in every answer, as GetBalance says, whatever the lots hold
    (Grant once answered its credit in lots, 50)."""
    await tenant.admin.SetAccountOptions(
        pb.SetAccountOptionsRequest(account_id="vip", unlimited=True, request_id=rid())
    )
    g = await grant(tenant, "vip", 50)
    assert g.balance == -1
    assert (await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="vip"))).balance == -1
    assert (await consume(tenant, "vip", quantity=3)).balance == -1
    added = await tenant.admin.SetBalance(
        pb.SetBalanceRequest(account_id="vip", amount=5, request_id=rid())
    )
    assert added.balance == -1
    reset = await tenant.admin.SetBalance(
        pb.SetBalanceRequest(account_id="vip", amount=7, reset=True, request_id=rid())
    )
    assert (reset.balance, reset.removed) == (-1, 55)
    voided = await tenant.admin.VoidGrant(
        pb.VoidGrantRequest(account_id="vip", lot_id=reset.lot.lot_id, reason="x", request_id=rid())
    )
    assert (voided.voided, voided.balance) == (7, -1)
    usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="vip"))
    assert (usage.remaining, usage.total) == (-1, -1)


async def test_set_balance_add_and_reset(tenant: Tenant, redis_client: redis.Redis) -> None:
    a = await grant(tenant, "u", 30)
    b = await grant(tenant, "u", 20, source=pb.LOT_SOURCE_BONUS)
    await consume(tenant, "u", amount=5)
    added = await tenant.admin.SetBalance(
        pb.SetBalanceRequest(account_id="u", amount=10, request_id=rid())
    )
    assert (added.balance, added.removed) == (55, 0)
    reset = await tenant.admin.SetBalance(
        pb.SetBalanceRequest(account_id="u", amount=7, reset=True, request_id=rid())
    )
    assert (reset.balance, reset.removed) == (7, 55)
    balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="u"))
    assert [(lot.lot_id, lot.remaining) for lot in balance.lots] == [(reset.lot.lot_id, 7)]
    resets = {
        e["lot"]: e["amount"]
        for e in events(redis_client, tenant.name, "u")
        if e["kind"] == "reset"
    }
    assert resets == {a.lot.lot_id: "30", b.lot.lot_id: "15", added.lot.lot_id: "10"}
    zero = await tenant.admin.SetBalance(
        pb.SetBalanceRequest(account_id="u", amount=0, reset=True, request_id=rid())
    )
    assert (zero.balance, zero.removed, zero.HasField("lot")) == (0, 7, False)
    usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="u"))
    assert (usage.total, usage.used, usage.removed, usage.remaining) == (67, 5, 62, 0)


async def test_unknown_account(tenant: Tenant) -> None:
    f = await fails(tenant.read.GetBalance(pb.GetBalanceRequest(account_id="ghost")))
    assert (f.code, f.reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    f = await fails(consume(tenant, "ghost"))
    assert (f.reason, f.metadata) == ("INSUFFICIENT_CREDITS", {"balance": "0", "required": "1"})


async def test_balance_limit(tenant: Tenant) -> None:
    top = 2**53 - 1
    await grant(tenant, "u", top - 1)
    g = await grant(tenant, "u", 1)
    assert g.balance == top  # exact at the very top: no double rounding anywhere
    f = await fails(grant(tenant, "u", 1))
    assert (f.code, f.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BALANCE_LIMIT_EXCEEDED")
    c = await consume(tenant, "u", amount=top - 2)
    assert c.balance == 2


async def test_set_rate_retry_does_not_restore_an_older_price(app: App, tenant: Tenant) -> None:
    """A retried SetRate replays its first answer; it never puts its old price back."""
    first = pb.SetRateRequest(rate=pb.Rate(feature="sms", credits_per_unit=2), request_id=rid())
    second = pb.SetRateRequest(rate=pb.Rate(feature="sms", credits_per_unit=3), request_id=rid())
    r1 = await tenant.admin.SetRate(first)
    await tenant.admin.SetRate(second)
    replay = await tenant.admin.SetRate(first)  # same millisecond: the manual clock stands still
    assert replay == r1
    rates = {
        r.feature: r.credits_per_unit
        for r in (await tenant.read.ListRates(pb.ListRatesRequest())).rates
    }
    assert rates["sms"] == 3
    await tenant.admin.Grant(pb.GrantRequest(account_id="u", amount=10, request_id=rid()))
    c = await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="u", feature="sms", request_id=rid())
    )
    assert c.amount == 3


def test_the_burn_key_is_read_by_lua_where_python_writes_it(redis_client: redis.Redis) -> None:
    """One layout of the burn key (storage.layout.BurnKey): _lib.lua's offsets are the
    ones Python writes, checked by running Lua's string.sub on a real key in Redis."""
    lib = scripts.library()
    assert f"local BURN_KEY_LOT_OFFSET = {BURN_KEY_LOT_OFFSET}\n" in lib
    start, stop = BURN_KEY_EXPIRY.start + 1, BURN_KEY_EXPIRY.stop  # 1-based, inclusive
    assert f"string.sub(burn_key, {start}, {stop})" in lib
    key = burn_key(7, 1_700_000_000_123, LotSource.BONUS, 1_600_000_000_456, "lot_abc:1")
    lot, expiry = redis_client.eval(
        "return {string.sub(ARGV[1], tonumber(ARGV[2])), string.sub(ARGV[1], tonumber(ARGV[3]),"
        " tonumber(ARGV[4]))}",
        0, key, BURN_KEY_LOT_OFFSET, start, stop,
    )  # fmt: skip
    assert (lot, expiry) == ("lot_abc:1", "1700000000123")
    assert key[BURN_KEY_EXPIRY] == "1700000000123"
