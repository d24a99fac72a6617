"""Check and CheckBatch: what Consume would decide and cost, from the same script logic,
with nothing written (no charge, outbox entry, idempotency record or seq)."""

from __future__ import annotations

import time
from typing import Any, cast

import grpc
import pytest
import redis
from google.protobuf import duration_pb2

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.constants import MAX_CONSUME_BATCH, MAX_CREDITS
from creditmeter.domain.clock import ManualClock
from creditmeter.storage import scripts
from creditmeter.storage.layout import AccountKeys, due_key, outbox_key, sessions_key
from creditmeter.storage.limits import NO_LIMITS
from creditmeter.storage.redis_client import is_cluster_url
from creditmeter.storage.redis_store import CheckCall, RedisStore
from creditmeter.transport.server import App
from tests.conftest import Tenant, rid
from tests.helpers import Failure, fails

#: Every test here runs on a single Redis and on a Redis Cluster (tests/conftest.py).
ON_CLUSTER = True


def store(app: App) -> RedisStore:
    assert app.metering is not None
    return app.metering.store


async def grant(tenant: Tenant, account: str, amount: int, **kw: Any) -> pb.GrantResponse:
    reply: pb.GrantResponse = await tenant.admin.Grant(
        pb.GrantRequest(account_id=account, amount=amount, request_id=rid(), **kw)
    )
    return reply


async def check(tenant: Tenant, account: str, feature: str = "text", **kw: int) -> pb.CheckResponse:
    """A Check with the read key (the weakest role allowed to call it)."""
    reply: pb.CheckResponse = await tenant.read.Check(
        pb.CheckRequest(account_id=account, feature=feature, **kw)
    )
    return reply


def consume(tenant: Tenant, account: str, feature: str = "text", **kw: int) -> Any:
    return tenant.meter.Consume(
        pb.ConsumeRequest(account_id=account, feature=feature, request_id=rid(), **kw)
    )


def assert_denied_as_consume(denial: pb.ConsumeError, failure: Failure) -> None:
    """A Check's denial says what the Consume of the same item failed with."""
    assert denial.code == failure.code.value[0]
    assert (denial.reason, denial.message) == (failure.reason, failure.message)
    assert dict(denial.metadata) == failure.metadata


def state(client: redis.Redis, tenant: str, account: str) -> dict[str, Any]:
    """Everything a charge of the account could write: its hash (seq included), its
    bucket's outbox, expiry and session indexes, its idempotency and session keys."""
    keys = AccountKeys(tenant, account)
    bucket = keys.bucket
    outbox = outbox_key(bucket)
    return {
        "account": client.hgetall(keys.account_key),
        "outbox": client.xlen(outbox) if client.exists(outbox) else 0,
        "last": client.xrevrange(outbox, count=1) if client.exists(outbox) else [],
        "due": client.zrange(due_key(bucket), 0, -1, withscores=True),
        "sessions": client.zrange(sessions_key(bucket), 0, -1, withscores=True),
        "other": sorted(
            k for k in client.scan_iter(match=f"{keys.base}:*") if k != keys.account_key
        ),
    }


async def test_allowed_and_refused_as_the_consume_right_after(tenant: Tenant) -> None:
    await grant(tenant, "a", 10)

    ok = await check(tenant, "a", quantity=3)
    assert (ok.allowed, ok.amount, ok.units, ok.feature, ok.balance) == (True, 3, 3, "text", 10)
    assert not ok.HasField("denial")
    charged = await consume(tenant, "a", quantity=3)
    assert (charged.amount, charged.units, charged.balance) == (3, 3, 7)

    no = await check(tenant, "a", amount=8)
    assert (no.allowed, no.amount, no.balance) == (False, 8, 7)
    assert no.denial.reason == "INSUFFICIENT_CREDITS"
    assert dict(no.denial.metadata) == {"balance": "7", "required": "8"}
    assert_denied_as_consume(no.denial, await fails(consume(tenant, "a", amount=8)))

    exact = await check(tenant, "a", amount=7)
    assert exact.allowed and exact.balance == 7
    assert (await consume(tenant, "a", amount=7)).balance == 0


async def test_an_account_never_granted_is_refused_as_consume_refuses_it(tenant: Tenant) -> None:
    no = await check(tenant, "nobody")
    assert (no.allowed, no.amount, no.balance) == (False, 1, 0)
    assert dict(no.denial.metadata) == {"balance": "0", "required": "1"}
    assert_denied_as_consume(no.denial, await fails(consume(tenant, "nobody")))
    # ... and the check created nothing.
    f = await fails(tenant.read.GetBalance(pb.GetBalanceRequest(account_id="nobody")))
    assert f.reason == "ACCOUNT_NOT_FOUND"


async def test_unlimited_account_is_allowed_until_its_usage_would_pass_2_53(
    tenant: Tenant,
) -> None:
    await tenant.admin.SetAccountOptions(
        pb.SetAccountOptionsRequest(account_id="vip", unlimited=True, request_id=rid())
    )
    ok = await check(tenant, "vip", amount=MAX_CREDITS)
    assert (ok.allowed, ok.amount, ok.balance) == (True, MAX_CREDITS, -1)
    await consume(tenant, "vip", amount=MAX_CREDITS)

    no = await check(tenant, "vip", amount=1)
    assert not no.allowed and no.balance == -1
    assert no.denial.reason == "BALANCE_LIMIT_EXCEEDED"
    assert_denied_as_consume(no.denial, await fails(consume(tenant, "vip", amount=1)))


async def test_amount_at_the_tenants_rate(tenant: Tenant) -> None:
    await grant(tenant, "r", 1_000)
    await tenant.admin.SetRate(pb.SetRateRequest(rate=pb.Rate(feature="text", credits_per_unit=2),
                                                 request_id=rid()))  # fmt: skip
    await tenant.admin.SetRate(pb.SetRateRequest(rate=pb.Rate(feature="voice", credits_per_unit=5),
                                                 request_id=rid()))  # fmt: skip
    await tenant.admin.SetRate(pb.SetRateRequest(
        rate=pb.Rate(feature="conf", credits_per_unit=3, unit=pb.RATE_UNIT_TIME,
                     billing_increment=duration_pb2.Duration(seconds=30)),
        request_id=rid(),
    ))  # fmt: skip
    cases = [
        ("text", {"quantity": 4}, 8, 4),  # 4 messages x 2
        ("text", {}, 2, 1),  # unset quantity: 1
        ("voice", {"quantity": 61}, 10, 2),  # 61 s: 2 one-minute increments x 5
        ("voice", {"quantity": 60}, 5, 1),
        ("conf", {"quantity": 61}, 9, 3),  # 30 s increments: 3 x 3
        ("voice", {"quantity": 61, "amount": 7}, 7, 2),  # an explicit amount wins
    ]
    for feature, kw, amount, units in cases:
        checked = await check(tenant, "r", feature, **kw)
        assert (checked.allowed, checked.amount, checked.units) == (True, amount, units), feature
        charged = await consume(tenant, "r", feature, **kw)
        assert (charged.amount, charged.units) == (amount, units), feature
        assert checked.balance - amount == charged.balance


async def test_expired_lot_is_not_counted(tenant: Tenant, clock: ManualClock) -> None:
    await grant(tenant, "e", 100, valid_for=duration_pb2.Duration(seconds=60))
    await grant(tenant, "e", 5)
    assert (await check(tenant, "e", amount=105)).allowed

    clock.advance(60_000)  # expiry is exclusive: at expires_at the credit is gone
    no = await check(tenant, "e", amount=6)
    assert (no.allowed, no.balance) == (False, 5)
    assert_denied_as_consume(no.denial, await fails(consume(tenant, "e", amount=6)))
    assert (await check(tenant, "e", amount=5)).allowed
    assert (await consume(tenant, "e", amount=5)).balance == 0


async def test_expired_lot_not_yet_swept_is_left_out_without_sweeping(
    app: App, tenant: Tenant, clock: ManualClock, redis_client: redis.Redis
) -> None:
    """The script itself leaves out credit whose expiry has passed (the server's clock is
    not moved, so no sweeper can have removed it), and writes nothing to do so."""
    await grant(tenant, "s", 100, valid_for=duration_pb2.Duration(seconds=60))
    await grant(tenant, "s", 5)
    keys = AccountKeys(tenant.name, "s")
    before = state(redis_client, tenant.name, "s")
    later = clock.now_ms() + 60_000

    refused = await store(app).check(CheckCall(keys, 6, later, "text", 6, NO_LIMITS))
    assert refused.refusal is not None
    assert (refused.refusal.reason, refused.refusal.metadata) == (
        "INSUFFICIENT_CREDITS", {"balance": "5", "required": "6"}
    )  # fmt: skip
    assert (refused.holdings.balance, refused.holdings.reserved) == (5, 0)
    allowed = await store(app).check(CheckCall(keys, 5, later, "text", 5, NO_LIMITS))
    assert allowed.refusal is None and allowed.holdings.balance == 5
    now = await store(app).check(CheckCall(keys, 105, clock.now_ms(), "text", 105, NO_LIMITS))
    assert now.refusal is None and now.holdings.balance == 105

    assert state(redis_client, tenant.name, "s") == before  # the lot is still there


async def test_credit_held_by_call_sessions_is_not_counted(tenant: Tenant) -> None:
    await grant(tenant, "c", 10)
    started = await tenant.meter.StartSession(
        pb.StartSessionRequest(account_id="c", feature="voice", session_id="call-1")
    )
    assert started.session.reserved_amount == 3
    no = await check(tenant, "c", amount=8)
    assert (no.allowed, no.balance) == (False, 7)
    assert dict(no.denial.metadata) == {"balance": "7", "required": "8"}
    assert_denied_as_consume(no.denial, await fails(consume(tenant, "c", amount=8)))
    ok = await check(tenant, "c", amount=7)
    assert ok.allowed and ok.balance == 7
    assert (await consume(tenant, "c", amount=7)).balance == 0


INVALID: list[dict[str, Any]] = [
    {"account_id": "", "feature": "text"},
    {"account_id": "{bad}", "feature": "text"},
    {"account_id": "a" * 129, "feature": "text"},
    {"account_id": "a", "feature": ""},
    {"account_id": "a", "feature": "Nope"},
    {"account_id": "a", "feature": "unknown_one"},
    {"account_id": "a", "feature": "text", "quantity": 0},
    {"account_id": "a", "feature": "text", "quantity": -3},
    {"account_id": "a", "feature": "text", "quantity": MAX_CREDITS + 1},
    {"account_id": "a", "feature": "text", "amount": 0},
    {"account_id": "a", "feature": "text", "amount": MAX_CREDITS + 1},
    {"account_id": "{bad}", "feature": "Nope", "quantity": 0, "amount": -1},
]


@pytest.mark.parametrize("fields", INVALID)
async def test_invalid_request_has_the_violations_of_consume(
    tenant: Tenant, redis_client: redis.Redis, fields: dict[str, Any]
) -> None:
    await grant(tenant, "a", 10)
    before = state(redis_client, tenant.name, "a")
    checked = await fails(tenant.read.Check(pb.CheckRequest(**fields)))
    consumed = await fails(tenant.meter.Consume(pb.ConsumeRequest(request_id=rid(), **fields)))
    assert checked.code == grpc.StatusCode.INVALID_ARGUMENT
    assert checked.reason == "INVALID_REQUEST" and checked.violations
    assert checked == consumed
    assert state(redis_client, tenant.name, "a") == before


@pytest.mark.settings(background_jobs=False)  # no sweeper: the expired lot stays unswept
async def test_a_check_changes_nothing(
    tenant: Tenant, clock: ManualClock, redis_client: redis.Redis
) -> None:
    """Allowed, refused, on an expired lot, beside a session's hold: the account's hash
    (balance, lots, seq, usage), its bucket's outbox, indexes and its other keys stay."""
    await grant(tenant, "n", 50, valid_for=duration_pb2.Duration(seconds=30))
    await grant(tenant, "n", 20)
    await tenant.meter.StartSession(
        pb.StartSessionRequest(account_id="n", feature="voice", session_id="call-n")
    )
    await consume(tenant, "n", quantity=2)
    before = state(redis_client, tenant.name, "n")
    assert before["outbox"] > 0 and before["account"]["seq"]

    for kw in ({"quantity": 1}, {"amount": 66}, {"amount": 67}, {"amount": MAX_CREDITS}):
        await check(tenant, "n", **kw)
    await tenant.read.CheckBatch(pb.CheckBatchRequest(items=[
        pb.CheckRequest(account_id="n", feature="voice", quantity=600),
        pb.CheckRequest(account_id="n", feature="text", amount=1),
    ]))  # fmt: skip
    assert state(redis_client, tenant.name, "n") == before

    clock.advance(31_000)  # the 50 expire: a check leaves them for the sweep
    # 20 left of the never-expiring lot (the charge took the expiring one first), 3 held.
    refused = await check(tenant, "n", amount=18)
    assert (refused.allowed, refused.balance) == (False, 17)
    assert dict(refused.denial.metadata) == {"balance": "17", "required": "18"}
    assert state(redis_client, tenant.name, "n") == before
    assert_denied_as_consume(refused.denial, await fails(consume(tenant, "n", amount=18)))
    assert state(redis_client, tenant.name, "n") != before  # the consume swept them


async def test_check_batch_mixed_outcomes_and_per_item_errors(app: App, tenant: Tenant) -> None:
    await grant(tenant, "b1", 10)
    await grant(tenant, "b2", 3)
    await tenant.admin.SetAccountOptions(
        pb.SetAccountOptionsRequest(account_id="vip", unlimited=True, request_id=rid())
    )
    items = [
        pb.CheckRequest(account_id="b1", feature="text", quantity=4),
        pb.CheckRequest(account_id="b1", feature="text", quantity=10),  # all of it: allowed
        pb.CheckRequest(account_id="b2", feature="voice", quantity=181),  # 4 increments
        pb.CheckRequest(account_id="{bad}", feature="text"),
        pb.CheckRequest(account_id="nobody", feature="text"),
        pb.CheckRequest(account_id="b2", feature="Nope", quantity=0),
        pb.CheckRequest(account_id="vip", feature="video", quantity=3_600),
        pb.CheckRequest(account_id="b2", feature="text", amount=3),
    ]
    await tenant.read.CheckBatch(pb.CheckBatchRequest(items=items[:1]))  # warm up
    pipelines = store(app).pipelines
    reply = await tenant.read.CheckBatch(pb.CheckBatchRequest(items=items))
    assert store(app).pipelines == pipelines + 1  # one round trip for the whole batch
    results = list(reply.results)
    assert [r.WhichOneof("outcome") for r in results] == [
        "response", "response", "response", "error", "response", "error", "response", "response"
    ]  # fmt: skip
    assert [r.response.allowed for r in results] == [
        True, True, False, False, False, False, True, True
    ]  # fmt: skip
    assert (results[2].response.amount, results[2].response.units) == (4, 4)
    assert dict(results[2].response.denial.metadata) == {"balance": "3", "required": "4"}
    assert results[6].response.balance == -1 and results[6].response.amount == 60

    # Each result is what a Check of that item alone answers, and each error what Check
    # fails with.
    for item, result in zip(items, results, strict=True):
        if result.WhichOneof("outcome") == "response":
            assert result.response == await tenant.read.Check(item)
        else:
            f = await fails(tenant.read.Check(item))
            assert result.error.code == f.code.value[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert (result.error.reason, result.error.message) == (f.reason, f.message)
            assert dict(result.error.field_violations) == f.violations
    # And a denial is what Consume then fails with.
    assert_denied_as_consume(
        results[2].response.denial, await fails(consume(tenant, "b2", "voice", quantity=181))
    )


async def test_check_batch_bounds(tenant: Tenant) -> None:
    f = await fails(tenant.read.CheckBatch(pb.CheckBatchRequest()))
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and "items" in f.violations
    many = [pb.CheckRequest(account_id="a", feature="text")] * (MAX_CONSUME_BATCH + 1)
    f = await fails(tenant.read.CheckBatch(pb.CheckBatchRequest(items=many)))
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and "items" in f.violations
    full = [pb.CheckRequest(account_id=f"a{i % 50}", feature="text") for i in range(1000)]
    reply = await tenant.read.CheckBatch(pb.CheckBatchRequest(items=full))
    assert len(reply.results) == MAX_CONSUME_BATCH
    assert all(r.response.denial.reason == "INSUFFICIENT_CREDITS" for r in reply.results)


async def test_a_replica_answers_the_check_function(
    tenant: Tenant, redis_url: str, redis_client: redis.Redis
) -> None:
    """The function is registered no-writes, so FCALL_RO runs it on a read-only replica
    (where a writing function is refused): Check could be served by replicas."""
    if not is_cluster_url(redis_url):
        pytest.skip("a replica is part of the cluster deployment")
    await grant(tenant, "rep", 9)
    keys = AccountKeys(tenant.name, "rep")
    cluster = cast(redis.RedisCluster, redis_client)
    primary = cluster.get_node_from_key(keys.account_key)
    assert cluster.get_redis_connection(primary).wait(1, 5_000) >= 1  # the grant is there
    # ROLE on a primary lists its replicas: [host, port, offset] each.
    role = cluster.get_redis_connection(primary).execute_command("ROLE")
    host, port = role[2][0][0], int(role[2][0][1])
    node = redis.Redis(host=host, port=port, decode_responses=True)
    try:
        node.execute_command("READONLY")
        now = str(int(time.time() * 1000))
        function = scripts.function_name(scripts.CHECK)
        # A charge's arguments: now, amount, feature, units, and limit args (none here).
        charge = (now, "10", "text", "10", *NO_LIMITS.argv())
        reply = node.fcall_ro(function, 1, keys.account_key, *charge)
        assert reply == [["OK2", "9", "0", "0", "INSUFFICIENT_CREDITS", "balance", "9",
                          "required", "10"]]  # fmt: skip
        with pytest.raises(redis.ResponseError):
            node.fcall_ro(scripts.function_name("consume"), 1, keys.account_key, now)
    finally:
        node.close()
