"""Meter: a bidirectional stream of consumptions, answered in order, with flow control."""

from __future__ import annotations

import asyncio
import time

import grpc

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.constants import METER_WINDOW
from creditmeter.transport.server import App
from tests.conftest import Tenant
from tests.helpers import ConsumeModel, assert_outcomes, fails
from tests.test_batch import grant, mixed_items, text


async def used(tenant: Tenant, account: str) -> int:
    return (await tenant.read.GetUsage(pb.GetUsageRequest(account_id=account))).used


async def test_meter_answers_in_order(tenant: Tenant) -> None:
    """Many requests, many failures: one response per request, in request order, each
    the outcome the same Consume would have had; the stream survives every failure."""
    grants = {"a": 500, "b": 120, "c": 30}
    for account, amount in grants.items():
        await grant(tenant, account, amount)
    requests = mixed_items(2_000, seed=11)
    model = ConsumeModel(balances=dict(grants))
    expected = [model.expect(r) for r in requests]

    async def send() -> object:
        for r in requests:
            yield pb.MeterRequest(consume=r)

    call = tenant.meter.Meter(send())
    results = [response.result async for response in call]
    assert await call.code() == grpc.StatusCode.OK
    assert_outcomes(requests, expected, results)
    for account in grants:
        balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id=account))
        assert balance.balance == model.balances[account], account


async def test_meter_read_key_refused(tenant: Tenant) -> None:
    await grant(tenant, "r", 5)

    async def one() -> object:
        yield pb.MeterRequest(consume=text("r"))

    async def drain() -> None:
        async for _ in tenant.read.Meter(one()):
            pass

    f = await fails(drain())
    assert (f.code, f.reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    assert (await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="r"))).balance == 5


async def test_client_that_stops_reading_stops_the_server(app: App, tenant: Tenant) -> None:
    """A client that writes but does not read: the server charges at most its window plus
    what the client's HTTP/2 receive window holds, then stops reading; it goes on as soon
    as the client reads again, in order, and every request is charged exactly once.

    The client turns off BDP probing so its receive window stays at the HTTP/2 default
    (64 KiB): with it on, the client's transport keeps accepting (and buffering) responses
    its application never reads, which is the client's choice, not the server's.
    """
    total = 12_000
    await grant(tenant, "bp", total)
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{app.port}", options=[("grpc.http2.bdp_probe", 0)]
    )
    call = pb_grpc.CreditsStub(channel).Meter(None, metadata=tenant.meter.metadata)
    requests = [text("bp") for _ in range(total)]
    written = 0

    async def writer() -> None:
        nonlocal written
        for r in requests:
            await call.write(pb.MeterRequest(consume=r))
            written += 1

    task = asyncio.create_task(writer())
    # Wait until the charged count stops moving (the same over a whole second).
    samples = [await used(tenant, "bp")]
    deadline = time.monotonic() + 30
    while len(samples) < 5 or len(set(samples[-5:])) > 1:
        assert time.monotonic() < deadline, samples
        await asyncio.sleep(0.25)
        samples.append(await used(tenant, "bp"))
    stalled = samples[-1]
    assert METER_WINDOW <= stalled < total, samples
    await asyncio.sleep(1.0)
    assert await used(tenant, "bp") == stalled  # still stopped, the stream still open

    # Read again: everything is charged, answered in order.
    results = []
    async for response in call:
        results.append(response)
        if len(results) == total:
            break
    await task
    await call.done_writing()
    assert [r async for r in call] == []
    assert await call.code() == grpc.StatusCode.OK
    assert [r.result.request_id for r in results] == [r.request_id for r in requests]
    assert [r.result.response.balance for r in results] == list(range(total - 1, -1, -1))
    assert await used(tenant, "bp") == total
    # The bound: the window, plus the responses 64 KiB of HTTP/2 window can hold
    # (5 bytes of gRPC framing each), plus a few for frames in flight.
    smallest = min(len(r.SerializeToString()) for r in results) + 5
    assert stalled <= METER_WINDOW + 65_535 // smallest + 8, (stalled, smallest)
    await channel.close()
