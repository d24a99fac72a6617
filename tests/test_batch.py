"""ConsumeBatch (per-item outcomes, one pipelined round trip, a flushed library) and the
coalescing of concurrent Consume calls."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.constants import COALESCE_MAX_BATCH, MAX_CONSUME_BATCH
from creditmeter.errors import BackendUnavailable, InsufficientCredits
from creditmeter.storage.entries import events as entry_events
from creditmeter.storage.layout import AccountKeys, bucket_of, outbox_key
from creditmeter.storage.limits import NO_LIMITS
from creditmeter.storage.redis_store import Call, ConsumeCall, RedisStore
from creditmeter.transport.server import App
from tests.conftest import Tenant, free_port, rid
from tests.helpers import ConsumeModel, assert_outcomes, fails, failure

#: Every test here runs on a single Redis and on a Redis Cluster (tests/conftest.py).
ON_CLUSTER = True


def store(app: App) -> RedisStore:
    assert app.metering is not None
    return app.metering.store


async def grant(tenant: Tenant, account: str, amount: int) -> None:
    await tenant.admin.Grant(pb.GrantRequest(account_id=account, amount=amount, request_id=rid()))


def text(account: str, request_id: str | None = None, **kw: int) -> pb.ConsumeRequest:
    return pb.ConsumeRequest(
        account_id=account, feature="text", request_id=request_id or rid(), **kw
    )


def copy(request: pb.ConsumeRequest) -> pb.ConsumeRequest:
    other = pb.ConsumeRequest()
    other.CopyFrom(request)
    return other


def mixed_items(n: int, seed: int) -> list[pb.ConsumeRequest]:
    """Charges on a few accounts (one never granted), with repeated request ids (same and
    other parameters, same and other account) and invalid items."""
    rng = random.Random(seed)
    items: list[pb.ConsumeRequest] = []
    for _ in range(n):
        roll = rng.random()
        account = rng.choice(["a", "a", "b", "c", "nobody"])
        if roll < 0.08 and items:  # the same request again: a replay (or a refusal replayed)
            items.append(copy(rng.choice(items)))
        elif roll < 0.13 and items:  # a request id reused with other parameters
            earlier = rng.choice(items)
            other = copy(earlier)
            other.quantity = other.quantity + 1 if other.HasField("quantity") else 2
            items.append(other)
        elif roll < 0.16 and items:  # a request id reused on another account: independent
            items.append(text("b", rng.choice(items).request_id or rid(), quantity=1))
        elif roll < 0.19:
            items.append(text("{bad}"))
        elif roll < 0.21:
            items.append(pb.ConsumeRequest(account_id=account, feature="Nope", request_id=rid()))
        elif roll < 0.23:
            items.append(pb.ConsumeRequest(account_id=account, feature="text"))  # no request id
        elif roll < 0.26:
            items.append(text(account, amount=rng.randint(1, 40)))
        else:
            items.append(text(account, quantity=rng.randint(1, 4)))
    return items


async def test_batch_of_1000_mixed_items(app: App, tenant: Tenant) -> None:
    """Each item gets its own outcome, exactly as the same Consume in that order would;
    balances end exact; the whole batch is one pipeline."""
    grants = {"a": 600, "b": 150, "c": 40}
    for account, amount in grants.items():
        await grant(tenant, account, amount)
    items = mixed_items(MAX_CONSUME_BATCH, seed=5)
    model = ConsumeModel(balances=dict(grants))
    expected = [model.expect(item) for item in items]
    kinds = {want[0] if want[0] != "error" else want[2] for want in expected}
    assert kinds == {
        "ok", "replay", "INVALID_REQUEST", "INSUFFICIENT_CREDITS", "IDEMPOTENCY_KEY_REUSED"
    }  # fmt: skip
    # Warm up (the server loaded the library at start; this is the first round trip).
    await tenant.meter.ConsumeBatch(pb.ConsumeBatchRequest(items=[text("warm-up")]))
    pipelines = store(app).pipelines

    reply = await tenant.meter.ConsumeBatch(pb.ConsumeBatchRequest(items=items))

    assert store(app).pipelines == pipelines + 1
    assert_outcomes(items, expected, list(reply.results))
    for account in ("a", "b", "c"):
        balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id=account))
        usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id=account))
        assert balance.balance == model.balances[account], account
        assert usage.used == model.used.get(account, 0), account
    f = await fails(tenant.read.GetBalance(pb.GetBalanceRequest(account_id="nobody")))
    assert f.code == grpc.StatusCode.NOT_FOUND  # refused charges created nothing

    # The same batch again: every success replays, every refusal is judged afresh.
    again = await tenant.meter.ConsumeBatch(pb.ConsumeBatchRequest(items=items))
    for first, second in zip(reply.results, again.results, strict=True):
        if first.WhichOneof("outcome") == "response":
            assert second == first
        elif first.error.reason != "IDEMPOTENCY_KEY_REUSED":
            assert second.error.reason == first.error.reason
    for account in ("a", "b", "c"):
        balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id=account))
        assert balance.balance == model.balances[account], account


async def test_item_error_is_what_consume_returns(tenant: Tenant) -> None:
    """A failed item carries the code, reason, message, metadata and violations of the
    status the same Consume fails with (one mapping for both)."""
    await grant(tenant, "e", 3)
    cases = [
        pb.ConsumeRequest(account_id="{x}", feature="Bad", quantity=0),
        text("e", quantity=5),
        pb.ConsumeRequest(account_id="e", feature="fax", request_id=rid()),
    ]
    batch = await tenant.meter.ConsumeBatch(pb.ConsumeBatchRequest(items=cases))
    for item, result in zip(cases, batch.results, strict=True):
        f = await fails(tenant.meter.Consume(item))
        e = result.error
        assert (e.code, e.reason, e.message) == (f.code.value[0], f.reason, f.message)
        assert dict(e.metadata) == f.metadata
        assert dict(e.field_violations) == f.violations
    assert batch.results[0].error.field_violations.keys() == {
        "account_id", "request_id", "feature", "quantity"
    }  # fmt: skip
    assert dict(batch.results[1].error.metadata) == {"balance": "3", "required": "5"}


async def test_batch_after_script_flush(
    app: App, tenant: Tenant, redis_client: redis.Redis
) -> None:
    """FUNCTION FLUSH before a batch: the library is missing, it is loaded, the items are sent
    again in order; each charged once."""
    await grant(tenant, "f", 10)
    items = [text("f", quantity=3) for _ in range(4)]
    redis_client.function_flush()
    pipelines = store(app).pipelines
    reply = await tenant.meter.ConsumeBatch(pb.ConsumeBatchRequest(items=items))
    assert store(app).pipelines == pipelines + 2  # the refused one, then the resend
    assert [r.response.balance for r in reply.results[:3]] == [7, 4, 1]
    assert reply.results[3].error.reason == "INSUFFICIENT_CREDITS"
    assert (await tenant.read.GetUsage(pb.GetUsageRequest(account_id="f"))).used == 9
    charges = [
        f
        for _, fields in redis_client.xrange(outbox_key(bucket_of(tenant.name, "f")))
        for f in entry_events(fields)
        if f["tenant"] == tenant.name and f["kind"] == "consume"
    ]
    assert len(charges) == 3
    # Single calls still work after the pipeline's reload, and after another flush.
    redis_client.function_flush()
    c = await tenant.meter.Consume(text("f"))
    assert c.balance == 0


@pytest.mark.parametrize("size", [0, MAX_CONSUME_BATCH + 1])
async def test_batch_size_limits(tenant: Tenant, size: int) -> None:
    await grant(tenant, "s", 5_000)
    items = [text("s") for _ in range(size)]
    f = await fails(tenant.meter.ConsumeBatch(pb.ConsumeBatchRequest(items=items)))
    assert (f.code, f.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert set(f.violations) == {"items"}
    assert (await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="s"))).balance == 5_000


async def test_batch_roles(tenant: Tenant) -> None:
    await grant(tenant, "r", 5)
    request = pb.ConsumeBatchRequest(items=[text("r")])
    f = await fails(tenant.read.ConsumeBatch(request))
    assert (f.code, f.reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    assert (await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="r"))).balance == 5
    for who in (tenant.meter, tenant.admin):
        reply = await who.ConsumeBatch(pb.ConsumeBatchRequest(items=[text("r")]))
        assert reply.results[0].response.amount == 1
    assert (await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="r"))).balance == 3


# --- coalescing of concurrent Consume calls ---------------------------------------------------
async def test_idle_call_goes_out_alone(app: App, tenant: Tenant) -> None:
    """One call when nothing else is in flight: one round trip of one item, at once."""
    await grant(tenant, "idle", 5)
    coalescer = store(app).consume_coalescer
    for n in range(1, 4):
        batches, items = coalescer.batches, coalescer.items
        c = await tenant.meter.Consume(text("idle"))
        assert c.balance == 5 - n
        assert (coalescer.batches, coalescer.items) == (batches + 1, items + 1)


async def test_concurrent_calls_share_round_trips(
    app: App, tenant: Tenant, redis_client: redis.Redis
) -> None:
    """600 charges issued together against 500 credits: exactly 500 succeed, in batches of
    at most COALESCE_MAX_BATCH (here: 3 round trips, not 600)."""
    await grant(tenant, "co", 500)
    metering = app.metering
    assert metering is not None
    coalescer = store(app).consume_coalescer
    batches, items = coalescer.batches, coalescer.items
    calls = 600
    outcomes = await asyncio.gather(
        *(metering.consume(tenant.name, "co", "text", request_id=rid()) for _ in range(calls)),
        return_exceptions=True,
    )
    ok = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, InsufficientCredits)]
    assert len(ok) == 500 and len(refused) == 100
    assert sorted(o.balance for o in ok) == list(range(500))  # each credit spent once
    assert coalescer.items - items == calls
    assert coalescer.batches - batches == -(-calls // COALESCE_MAX_BATCH)
    assert coalescer.largest_batch <= COALESCE_MAX_BATCH
    assert (await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="co"))).balance == 0
    charges = [
        f
        for _, fields in redis_client.xrange(outbox_key(bucket_of(tenant.name, "co")))
        for f in entry_events(fields)
        if f["tenant"] == tenant.name and f["account"] == "co" and f["kind"] == "consume"
    ]
    assert len(charges) == 500


async def test_coalesced_race_over_grpc(
    app: App, tenant: Tenant, redis_client: redis.Redis
) -> None:
    """Clients racing over gRPC: exact counts, never negative, and calls did share
    pipelines (fewer round trips than calls)."""
    await grant(tenant, "race", 1_000)
    coalescer = store(app).consume_coalescer
    batches, items = coalescer.batches, coalescer.items
    lowest = 1_000
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal lowest
        while not done.is_set():
            b = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="race"))
            lowest = min(lowest, b.balance)
            await asyncio.sleep(0.005)

    async def client() -> tuple[int, int]:
        ok = refused = 0
        for _ in range(40):
            try:
                await tenant.meter.Consume(text("race"))
                ok += 1
            except grpc.aio.AioRpcError as error:
                assert failure(error).reason == "INSUFFICIENT_CREDITS"
                refused += 1
        return ok, refused

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(client() for _ in range(32)))
    done.set()
    await watcher
    assert sum(ok for ok, _ in results) == 1_000
    assert sum(r for _, r in results) == 32 * 40 - 1_000
    assert lowest >= 0
    assert (await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="race"))).balance == 0
    assert coalescer.items - items == 32 * 40
    assert coalescer.batches - batches < coalescer.items - items  # some calls shared a trip


async def test_lost_redis_fails_every_coalesced_call() -> None:
    """Redis unreachable: each queued caller gets BACKEND_UNAVAILABLE (retry-safe), none
    hangs, and a batch fails as a whole the same way."""
    # Nothing listens there; no retries, so the test does not wait out backoffs.
    client = aioredis.Redis(port=free_port(), decode_responses=True, retry=Retry(NoBackoff(), 0))
    dead = RedisStore(client)
    keys = AccountKeys("t", "a")
    calls = [Call(now_ms=1, txn=f"txn_{i}", request_id=f"r{i}", fingerprint="f") for i in range(5)]
    outcomes = await asyncio.gather(
        *(dead.consume(keys, call, 1, "text", 1, NO_LIMITS) for call in calls),
        return_exceptions=True,
    )
    assert all(isinstance(o, BackendUnavailable) for o in outcomes), outcomes
    assert dead.consume_coalescer.items == 5
    with pytest.raises(BackendUnavailable):
        await dead.consume_many([ConsumeCall(keys, calls[0], 1, "text", 1, NO_LIMITS)])
    await client.aclose()
