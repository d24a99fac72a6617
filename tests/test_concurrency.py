"""Atomicity under concurrency: no overdraft, no double charge, scripts reloaded on demand."""

from __future__ import annotations

import asyncio

import grpc
import redis

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.storage.entries import events as entry_events
from creditmeter.storage.layout import AccountKeys, bucket_of, outbox_key
from creditmeter.transport.server import App
from tests.conftest import Caller, Tenant, rid
from tests.helpers import failure

#: Every test here runs on a single Redis and on a Redis Cluster (tests/conftest.py).
ON_CLUSTER = True

CLIENTS = 64
CALLS_PER_CLIENT = 500
START_BALANCE = 10_000


async def test_overdraft_race(app: App, tenant: Tenant, redis_client: redis.Redis) -> None:
    """64 clients x 500 Consume(1) against 10,000 credits: exactly 10,000 succeed."""
    await tenant.admin.Grant(
        pb.GrantRequest(account_id="race", amount=START_BALANCE, request_id=rid())
    )
    acct_key = AccountKeys(tenant.name, "race").account_key
    lowest = START_BALANCE
    done = asyncio.Event()

    async def watch_balance() -> None:
        nonlocal lowest
        while not done.is_set():
            lowest = min(
                lowest, int(await asyncio.to_thread(redis_client.hget, acct_key, "balance"))
            )
            await asyncio.sleep(0.005)

    async def client() -> tuple[int, int]:
        ok = refused = 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            caller = Caller(pb_grpc.CreditsStub(channel), tenant.meter.key)
            for _ in range(CALLS_PER_CLIENT):
                try:
                    await caller.Consume(
                        pb.ConsumeRequest(account_id="race", feature="text", request_id=rid())
                    )
                    ok += 1
                except grpc.aio.AioRpcError as error:
                    f = failure(error)
                    assert (f.code, f.reason) == (
                        grpc.StatusCode.FAILED_PRECONDITION,
                        "INSUFFICIENT_CREDITS",
                    )
                    refused += 1
        return ok, refused

    watcher = asyncio.create_task(watch_balance())
    results = await asyncio.gather(*(client() for _ in range(CLIENTS)))
    done.set()
    await watcher

    succeeded = sum(ok for ok, _ in results)
    refused = sum(r for _, r in results)
    assert succeeded == START_BALANCE
    assert refused == CLIENTS * CALLS_PER_CLIENT - START_BALANCE
    balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="race"))
    assert balance.balance == 0 and lowest >= 0
    usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="race"))
    assert usage.used == START_BALANCE
    charged = [
        int(f["amount"])
        for _, fields in redis_client.xrange(outbox_key(bucket_of(tenant.name, "race")))
        for f in entry_events(fields)
        if f["tenant"] == tenant.name and f["kind"] == "consume"
    ]
    assert sum(charged) == START_BALANCE and len(charged) == START_BALANCE


async def test_idempotency_storm(tenant: Tenant, redis_client: redis.Redis) -> None:
    """The same request id sent 50 times at once: charged once, every reply identical."""
    await tenant.admin.Grant(pb.GrantRequest(account_id="storm", amount=100, request_id=rid()))
    request = pb.ConsumeRequest(account_id="storm", feature="text", quantity=7, request_id=rid())
    replies = await asyncio.gather(*(tenant.meter.Consume(request) for _ in range(50)))
    serialized = {r.SerializeToString(deterministic=True) for r in replies}
    assert len(serialized) == 1
    assert replies[0].amount == 7 and replies[0].balance == 93
    balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="storm"))
    assert balance.balance == 93
    consumes = [
        f
        for _, fields in redis_client.xrange(outbox_key(bucket_of(tenant.name, "storm")))
        for f in entry_events(fields)
        if f["tenant"] == tenant.name and f["kind"] == "consume"
    ]
    assert len(consumes) == 1

    grant = pb.GrantRequest(account_id="storm", amount=5, request_id=rid())
    grants = await asyncio.gather(*(tenant.admin.Grant(grant) for _ in range(50)))
    assert len({g.SerializeToString(deterministic=True) for g in grants}) == 1
    assert (await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="storm"))).balance == 98


async def test_script_flush_mid_run(tenant: Tenant, redis_client: redis.Redis) -> None:
    """FUNCTION FLUSH while calls run: the library is loaded again, every call succeeds."""
    await tenant.admin.Grant(pb.GrantRequest(account_id="flush", amount=1000, request_id=rid()))

    async def consumer() -> int:
        ok = 0
        for _ in range(40):
            await tenant.meter.Consume(
                pb.ConsumeRequest(account_id="flush", feature="text", request_id=rid())
            )
            ok += 1
        return ok

    async def flusher() -> None:
        for _ in range(10):
            await asyncio.to_thread(redis_client.function_flush)
            await asyncio.sleep(0.01)

    *counts, _ = await asyncio.gather(*(consumer() for _ in range(8)), flusher())
    assert sum(counts) == 320
    redis_client.function_flush()
    await tenant.admin.SetBalance(
        pb.SetBalanceRequest(account_id="flush", amount=1, request_id=rid())
    )
    assert (await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="flush"))).balance == 681
