"""The Python SDK (creditmeter.client), sync and asyncio, against the real in-process server:
retries that keep the request id over a lost response, exceptions per error reason, bounded
retries on a dead address, paging, and call sessions. The sync client blocks, so the tests
run it in a thread while the server serves on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pathlib
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from creditmeter import client as sdk
from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.api.credits.v1 import packs_pb2
from creditmeter.client import requests as rq
from creditmeter.transport import interceptors
from creditmeter.transport.server import App
from tests.conftest import Tenant, free_port, rid
from tests.test_history import caught_up

#: Short waits between attempts, so the tests spend their time on what they check.
FAST_RETRY = sdk.RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)
#: How many times a test resends a call by hand that found its connection cut.
HAND_RESENDS = 5

_HTTP2_FRAME_HEADER = 9
_HTTP2_HEADERS = 0x1


class ResponseLosingProxy:
    """A TCP proxy between a client and the server that reads the server's HTTP/2 frames and,
    while `losses` is above zero, cuts the connection at the first response HEADERS frame
    (a unary response starts with one, sent once the handler has returned: the server has
    committed) instead of passing it on. `on_loss` runs before the cut, to look at the
    server's state at that moment; with `stall_s` the connection hangs that long first
    (the client's deadline passes before it breaks)."""

    def __init__(
        self,
        upstream_port: int,
        on_loss: Callable[[], Awaitable[None]] | None = None,
        stall_s: float = 0.0,
    ) -> None:
        self.upstream_port = upstream_port
        self.on_loss = on_loss
        self.stall_s = stall_s
        self.losses = 0
        self.lost = 0
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ResponseLosingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        self.connections += 1
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def upstream() -> None:
            while data := await client_r.read(65536):
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while True:
                header = await server_r.readexactly(_HTTP2_FRAME_HEADER)
                payload = await server_r.readexactly(int.from_bytes(header[:3], "big"))
                stream_id = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
                if header[3] == _HTTP2_HEADERS and stream_id and self.losses > 0:
                    self.losses -= 1
                    self.lost += 1
                    if self.on_loss is not None:
                        await self.on_loss()
                    await asyncio.sleep(self.stall_s)
                    return
                client_w.write(header + payload)
                await client_w.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            # abort(): a reset, not a graceful close, as when a network path dies.
            client_w.transport.abort()
            server_w.transport.abort()
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]


def address(app: App) -> str:
    return f"127.0.0.1:{app.port}"


@pytest.fixture
async def aclient(app: App, tenant: Tenant) -> AsyncIterator[sdk.AsyncClient]:
    async with sdk.AsyncClient(address(app), tenant.admin.key, timeout=5) as client:
        yield client


# --- unit: error mapping, request ids, retry policy ------------------------------------
def test_every_error_reason_of_the_proto_has_its_exception() -> None:
    # keys(): the enum wrapper has no __iter__.
    reasons = {n.removeprefix("ERROR_REASON_") for n in pb.ErrorReason.keys()}  # noqa: SIM118
    reasons -= {"UNSPECIFIED"}
    assert reasons == set(sdk.BY_REASON)
    for reason, cls in sdk.BY_REASON.items():
        assert reason == cls.REASON
        assert issubclass(cls, sdk.CreditmeterError)


def test_each_exception_belongs_to_the_family_of_the_status_the_server_sends() -> None:
    for domain_error, code in interceptors._STATUS.items():
        assert issubclass(sdk.BY_REASON[domain_error.reason], sdk.errors.BY_CODE[code]), (
            domain_error.reason,
            code,
        )


def test_mutating_requests_get_a_request_id_once_and_keep_a_given_one() -> None:
    req = rq.consume("a", "text")
    assert rq.with_request_id(req) is True
    first = req.request_id
    assert len(first) == 36  # a uuid4
    assert rq.with_request_id(req) is True
    assert req.request_id == first  # a retry sends the same id
    given = rq.consume("a", "text", request_id="msg-42")
    rq.with_request_id(given)
    assert given.request_id == "msg-42"
    assert rq.with_request_id(pb.GetBalanceRequest(account_id="a")) is False
    assert rq.with_request_id(pb.UpdateSessionRequest(session_id="s", sequence=1)) is True


def test_retry_policy_retries_unavailable_always_and_deadline_only_when_idempotent() -> None:
    policy = sdk.RetryPolicy(max_attempts=3)
    unavailable, deadline = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED
    assert policy.should_retry(unavailable, 1, idempotent=False)
    assert policy.should_retry(deadline, 1, idempotent=True)
    assert not policy.should_retry(deadline, 1, idempotent=False)
    assert not policy.should_retry(unavailable, 3, idempotent=True)  # the bound
    for code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                 grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL):  # fmt: skip
        assert not policy.should_retry(code, 1, idempotent=True)
    assert not sdk.NO_RETRY.should_retry(unavailable, 1, idempotent=True)


def test_backoff_grows_exponentially_up_to_its_cap_with_full_jitter() -> None:
    policy = sdk.RetryPolicy(max_attempts=10, initial_backoff_s=0.1, max_backoff_s=1.0)
    assert [policy.backoff_cap_s(n) for n in (1, 2, 3, 4, 5, 6)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )
    rng = random.Random(7)
    waits = [policy.backoff_s(3, rng) for _ in range(500)]
    assert all(0 <= w <= 0.4 for w in waits)
    assert min(waits) < 0.05 and max(waits) > 0.35  # spread over the whole range
    with pytest.raises(ValueError):
        sdk.RetryPolicy(max_attempts=0)


# --- unit: the call-session arithmetic -------------------------------------------------
def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def test_session_meter_reports_before_the_quota_runs_out_and_rounds_the_call_once() -> None:
    meter = sdk.SessionMeter(100.0, margin_s=5, margin_fraction=0.2, min_interval_s=0.5)
    meter.granted(100.0, 180, False, _ts(10_000 + 180), wall_now=10_000)
    assert meter.next_report_at() == pytest.approx(100 + 175)  # 5 s margin
    assert meter.must_end_at() == pytest.approx(280)
    assert meter.report(100 + 175.6, final=False) == (1, 175)  # whole seconds, rest carried
    meter.granted(275.6, 180, False, None, wall_now=0)
    assert meter.report(275.6 + 30.2, final=True) == (2, 31)  # ceil(205.8) - 175
    assert meter.reported_seconds == 206  # the call's 205.8 s rounded up once


def test_session_meter_short_quota_uses_a_fractional_margin_and_valid_until_bounds_it() -> None:
    meter = sdk.SessionMeter(0.0, margin_s=5, margin_fraction=0.2, min_interval_s=0.5)
    meter.granted(0.0, 10, False, None, wall_now=0)
    assert meter.next_report_at() == pytest.approx(8.0)  # 20 % of 10 s
    # The server wants a report sooner than the quota lasts: its validity decides.
    meter.granted(0.0, 60, False, _ts(1_000 + 20), wall_now=1_000)
    assert meter.next_report_at() == pytest.approx(16.0)
    # A server clock far behind ours cannot make the helper report in a loop.
    meter.granted(0.0, 60, False, _ts(1_000 - 3_600), wall_now=1_000)
    assert meter.next_report_at() == pytest.approx(0.5)


def test_session_meter_final_unit_stops_reports_and_fixes_the_end() -> None:
    meter = sdk.SessionMeter(0.0)
    meter.granted(12.0, 30, True, _ts(1_000 + 30), wall_now=1_000)
    assert meter.next_report_at() is None
    assert meter.must_end_at() == pytest.approx(42.0)
    # valid_until is the quota's end as the server saw it, a network delay ago: no report.
    meter.granted(12.0, 30, True, _ts(1_000 + 29.9), wall_now=1_000)
    assert meter.next_report_at() is None
    # ...unless the validity ends first: then it still reports to keep the session alive.
    meter.granted(12.0, 30, True, _ts(1_000 + 10), wall_now=1_000)
    assert meter.next_report_at() is not None


# --- live: a response lost after the server committed ---------------------------------
async def test_lost_response_is_retried_with_the_same_request_id_async(
    app: App, tenant: Tenant
) -> None:
    await tenant.admin.Grant(pb.GrantRequest(account_id="lost", amount=100, request_id=rid()))
    balance_when_lost: list[int] = []

    async def look() -> None:
        reply = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="lost"))
        balance_when_lost.append(reply.balance)

    async with (
        ResponseLosingProxy(app.port, on_loss=look) as proxy,
        sdk.AsyncClient(proxy.address, tenant.meter.key, timeout=5, retry=FAST_RETRY) as client,
    ):
        await client.get_balance("lost")  # connected through the proxy
        proxy.losses = 1
        reply = await client.consume("lost", "text", quantity=7)

    assert proxy.lost == 1
    assert balance_when_lost == [93]  # the server had committed when the answer was lost
    assert proxy.connections == 2  # the retry went over a new connection
    assert (reply.amount, reply.units, reply.balance) == (7, 7, 93)
    balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="lost"))
    usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="lost"))
    assert balance.balance == 93  # charged once
    assert (usage.used, [(f.feature, f.units) for f in usage.features]) == (7, [("text", 7)])


async def test_lost_response_is_retried_with_the_same_request_id_sync(
    app: App, tenant: Tenant
) -> None:
    await tenant.admin.Grant(pb.GrantRequest(account_id="lost", amount=50, request_id=rid()))
    async with ResponseLosingProxy(app.port) as proxy:
        proxy.losses = 1

        def charge() -> pb.ConsumeResponse:
            with sdk.Client(proxy.address, tenant.meter.key, timeout=5, retry=FAST_RETRY) as c:
                return c.consume("lost", "voice", quantity=61)  # 2 one-minute increments

        reply = await asyncio.to_thread(charge)

    assert proxy.lost == 1
    assert (reply.amount, reply.units, reply.balance) == (2, 2, 48)
    usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="lost"))
    assert (usage.used, usage.remaining) == (2, 48)


async def test_without_retries_a_lost_response_surfaces_as_unavailable(
    app: App, tenant: Tenant
) -> None:
    """The counterpart of the two above: the retry is what makes them succeed."""
    await tenant.admin.Grant(pb.GrantRequest(account_id="lost", amount=10, request_id=rid()))
    async with ResponseLosingProxy(app.port) as proxy:
        proxy.losses = 1
        async with sdk.AsyncClient(proxy.address, tenant.meter.key, retry=sdk.NO_RETRY) as c:
            with pytest.raises(sdk.Unavailable) as caught:
                await c.consume("lost", "text", request_id="msg-1")
            assert caught.value.attempts == 1
            # Sent again by hand with the same id: the first charge's answer, not a second.
            # (Resent until it gets through: the channel may not have noticed the cut
            # connection yet, and then the resend fails on it with UNAVAILABLE too.)
            again = None
            for _ in range(HAND_RESENDS):
                try:
                    again = await c.consume("lost", "text", request_id="msg-1")
                    break
                except sdk.Unavailable:
                    await asyncio.sleep(0.1)
    assert again is not None and again.balance == 9
    usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="lost"))
    assert usage.used == 1


async def test_deadline_exceeded_is_retried_for_a_charge_but_not_for_a_read(
    app: App, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="creditmeter.client")
    await tenant.admin.Grant(pb.GrantRequest(account_id="slow", amount=20, request_id=rid()))
    async with (
        ResponseLosingProxy(app.port, stall_s=1.0) as proxy,
        sdk.AsyncClient(proxy.address, tenant.meter.key, timeout=0.5, retry=FAST_RETRY) as client,
    ):
        proxy.losses = 1
        reply = await client.consume("slow", "text", quantity=5)
        assert reply.balance == 15
        proxy.losses = 1
        with pytest.raises(sdk.DeadlineExceeded) as caught:
            await client.get_usage("slow")
    assert caught.value.attempts == 1  # a read that timed out is not repeated
    retried = [r.getMessage() for r in caplog.records if r.name == "creditmeter.client"]
    assert retried and retried[0].startswith("Consume attempt 1 failed with DEADLINE_EXCEEDED")
    assert not any(m.startswith("GetUsage") for m in retried)
    usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="slow"))
    assert (usage.used, usage.remaining) == (5, 15)  # the charge went through once


# --- live: exceptions ------------------------------------------------------------------
async def test_insufficient_credits_carries_balance_and_required(
    aclient: sdk.AsyncClient,
) -> None:
    await aclient.grant("poor", 7)
    with pytest.raises(sdk.InsufficientCredits) as caught:
        await aclient.consume("poor", "text", quantity=10)
    error = caught.value
    assert (error.balance, error.required) == (7, 10)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "INSUFFICIENT_CREDITS"
    assert isinstance(error, sdk.FailedPrecondition)
    assert error.attempts == 1  # a final answer is not retried
    assert (await aclient.get_balance("poor")).balance == 7


async def test_invalid_request_carries_field_violations_sync(app: App, tenant: Tenant) -> None:
    def bad() -> sdk.CreditmeterError:
        with sdk.Client(address(app), tenant.admin.key) as client:
            try:
                client.grant("has space", -5)
            except sdk.CreditmeterError as error:
                return error
        raise AssertionError("the invalid grant was accepted")

    error = await asyncio.to_thread(bad)
    assert isinstance(error, sdk.InvalidRequest)
    assert isinstance(error, sdk.InvalidArgument)
    assert set(error.field_violations) == {"account_id", "amount"}
    assert error.metadata["fields"].split(",") == list(error.field_violations)


async def test_idempotency_key_reused_is_its_own_exception(aclient: sdk.AsyncClient) -> None:
    await aclient.grant("idem", 10, request_id="g-1")
    with pytest.raises(sdk.IdempotencyKeyReused) as caught:
        await aclient.grant("idem", 11, request_id="g-1")
    assert caught.value.request_id == "g-1"


async def test_wrong_key_is_unauthenticated_and_read_key_cannot_consume(
    app: App, tenant: Tenant
) -> None:
    async with sdk.AsyncClient(address(app), "cm_nope_secret", retry=FAST_RETRY) as client:
        with pytest.raises(sdk.Unauthenticated) as caught:
            await client.get_balance("x")
    assert isinstance(caught.value, sdk.ApiKeyInvalid)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED

    async with sdk.AsyncClient(address(app), tenant.read.key) as client:
        with pytest.raises(sdk.PermissionDenied) as denied:
            await client.consume("x", "text")
    assert isinstance(denied.value, sdk.RoleNotAllowed)
    assert denied.value.metadata == {"role": "read", "method": "Consume"}


async def test_not_found_reasons_are_not_found_exceptions(aclient: sdk.AsyncClient) -> None:
    with pytest.raises(sdk.PackNotFound) as caught:
        await aclient.purchase_pack("a", "pack_missing", payment_reference="p-1")
    assert isinstance(caught.value, sdk.NotFound)


def test_retries_stop_after_the_bound_on_a_dead_address() -> None:
    policy = sdk.RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    start = time.monotonic()
    with (
        sdk.Client(f"127.0.0.1:{free_port()}", "k", timeout=5, retry=policy) as client,
        pytest.raises(sdk.Unavailable) as caught,
    ):
        client.consume("a", "text")
    assert caught.value.attempts == 3
    assert caught.value.reason == ""  # no server said anything
    assert time.monotonic() - start < 5  # each attempt failed fast; no deadline was waited


async def test_async_retries_stop_after_the_bound_on_a_dead_address() -> None:
    policy = sdk.RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02)
    async with sdk.AsyncClient(f"127.0.0.1:{free_port()}", "k", retry=policy) as client:
        with pytest.raises(sdk.Unavailable) as caught:
            await client.get_usage("a")
    assert caught.value.attempts == 2


# --- live: convenience methods ---------------------------------------------------------
async def test_rates_packs_and_purchases_through_the_async_client(
    aclient: sdk.AsyncClient,
) -> None:
    await aclient.set_rate("sticker", 3)
    rates = {r.feature: r.credits_per_unit for r in (await aclient.list_rates()).rates}
    assert rates["sticker"] == 3
    await aclient.grant("buyer", 10)
    assert (await aclient.consume("buyer", "sticker", quantity=2)).amount == 6

    pack = (await aclient.create_pack(sdk_pack("Starter", 100))).pack
    listed = [p.pack_id for p in (await aclient.list_packs()).packs]
    assert pack.pack_id in listed
    bought = await aclient.purchase_pack("buyer", pack.pack_id, payment_reference="pay-1")
    assert bought.balance == 104
    purchases = (await aclient.list_purchases("buyer")).purchases
    assert [p.purchase_id for p in purchases] == [bought.purchase.purchase_id]
    refund = await aclient.refund_purchase(bought.purchase.purchase_id, reason="test")
    assert (refund.refunded_credits, refund.balance) == (100, 4)


def sdk_pack(name: str, credits: int) -> packs_pb2.Pack:
    return packs_pb2.Pack(
        name=name, credits=credits, price=packs_pb2.Price(amount_minor=500, currency="EUR")
    )


@pytest.mark.flusher
async def test_iter_transactions_walks_every_page(app: App, tenant: Tenant) -> None:
    async with sdk.AsyncClient(address(app), tenant.admin.key) as client:
        for amount in (1, 2, 3, 4, 5):
            await client.grant("pages", amount)
        await client.consume("pages", "text", quantity=4)
        await caught_up(app)
        seen = [t async for t in client.iter_transactions("pages", page_size=2)]
        consumes = [t async for t in client.iter_transactions("pages", kinds=["consume"])]

    assert [t.amount for t in seen] == [4, 5, 4, 3, 2, 1]  # newest first, over 3 pages
    assert [t.kind for t in consumes] == [pb.TRANSACTION_KIND_CONSUME]

    def walk() -> list[int]:
        with sdk.Client(address(app), tenant.read.key) as c:
            return [t.amount for t in c.iter_transactions("pages", page_size=4)]

    assert await asyncio.to_thread(walk) == [4, 5, 4, 3, 2, 1]


async def test_check_and_check_batch_through_the_async_client(app: App, tenant: Tenant) -> None:
    async with sdk.AsyncClient(address(app), tenant.read.key, timeout=5) as reader:
        async with sdk.AsyncClient(address(app), tenant.admin.key, timeout=5) as admin:
            await admin.grant("asker", 5)
        ok = await reader.check("asker", "voice", quantity=61)  # a read key may check
        assert (ok.allowed, ok.amount, ok.units, ok.balance) == (True, 2, 2, 5)
        no = await reader.check("asker", "text", amount=6)
        assert not no.allowed and no.denial.reason == "INSUFFICIENT_CREDITS"
        assert dict(no.denial.metadata) == {"balance": "5", "required": "6"}
        batch = await reader.check_batch([
            sdk.check_request("asker", "text", quantity=5),
            sdk.check_request("has space", "text"),
            sdk.check_request("asker", "text", amount=6),
        ])  # fmt: skip
        outcomes = [r.WhichOneof("outcome") for r in batch.results]
        assert outcomes == ["response", "error", "response"]
        assert batch.results[0].response.allowed and not batch.results[2].response.allowed
        assert batch.results[1].error.reason == "INVALID_REQUEST"
        assert "account_id" in batch.results[1].error.field_violations
        with pytest.raises(sdk.InvalidRequest) as caught:
            await reader.check("asker", "text", quantity=0)
        assert set(caught.value.field_violations) == {"quantity"}
        assert (await reader.get_balance("asker")).balance == 5  # nothing was charged


async def test_check_and_check_batch_through_the_sync_client(app: App, tenant: Tenant) -> None:
    def run() -> tuple[pb.CheckResponse, pb.CheckBatchResponse]:
        with sdk.Client(address(app), tenant.admin.key) as client:
            client.grant("sync-asker", 3)
            with sdk.Client(address(app), tenant.meter.key) as meter:
                one = meter.check("sync-asker", "text", quantity=3)
                many = meter.check_batch([sdk.check_request("sync-asker", "text", amount=4)])
            return one, many

    one, many = await asyncio.to_thread(run)
    assert (one.allowed, one.amount, one.balance) == (True, 3, 3)
    [only] = many.results
    assert not only.response.allowed
    assert dict(only.response.denial.metadata) == {"balance": "3", "required": "4"}


async def test_usage_limits_through_the_async_client(app: App, tenant: Tenant) -> None:
    async with sdk.AsyncClient(address(app), tenant.admin.key, timeout=5) as admin:
        await admin.grant("capped", 50)
        tenant_limit = await admin.set_usage_limit("text", "day", 2)
        assert tenant_limit.limit.limit == 2
        await admin.set_usage_limit("voice", "week", 4, unit="credits", account_id="capped")
        options = await admin.set_account_options("capped", time_zone="Europe/Paris")
        assert options.options.time_zone == "Europe/Paris"
        await admin.consume("capped", "text", quantity=2)
        with pytest.raises(sdk.UsageLimitExceeded) as caught:
            await admin.consume("capped", "text")
        refusal = caught.value
        assert (refusal.feature, refusal.period, refusal.limit) == ("text", "day", 2)
        assert refusal.used == 2
        assert isinstance(refusal, sdk.FailedPrecondition)
        async with sdk.AsyncClient(address(app), tenant.read.key, timeout=5) as reader:
            defaults = await reader.list_usage_limits()
            mine = await reader.list_usage_limits("capped")
        assert [(s.limit.feature, s.limit.limit) for s in defaults.limits] == [("text", 2)]
        assert sorted((s.limit.feature, s.used, s.account_override) for s in mine.limits) == [
            ("text", 2, False), ("voice", 0, True)]  # fmt: skip
        await admin.set_usage_limit("text", "day", None)
        await admin.set_account_options("capped", ignore_usage_limits=True)
        assert (await admin.list_usage_limits("capped")).limits == []
        await admin.consume("capped", "text", quantity=5)
        with pytest.raises(sdk.InvalidRequest) as bad:
            await admin.set_account_options("capped", time_zone="Nowhere/Land")
        assert set(bad.value.field_violations) == {"time_zone"}


async def test_usage_limits_through_the_sync_client(app: App, tenant: Tenant) -> None:
    def run() -> tuple[pb.ListUsageLimitsResponse, str]:
        with sdk.Client(address(app), tenant.admin.key) as client:
            client.grant("sync-capped", 9)
            client.set_usage_limit("text", "month", 3, account_id="sync-capped")
            client.consume("sync-capped", "text", quantity=3)
            try:
                client.consume("sync-capped", "text")
            except sdk.UsageLimitExceeded as error:
                reason = error.reason
            return client.list_usage_limits("sync-capped"), reason

    listed, reason = await asyncio.to_thread(run)
    assert reason == "USAGE_LIMIT_EXCEEDED"
    [status] = listed.limits
    assert (status.limit.limit, status.used, status.remaining) == (3, 3, 0)


async def test_recharge_policies_through_both_clients(app: App, tenant: Tenant) -> None:
    async with sdk.AsyncClient(address(app), tenant.admin.key, timeout=5) as admin:
        default = await admin.set_recharge_policy(100)
        assert (default.policy.threshold, default.account_override) == (100, False)
        own = await admin.set_recharge_policy(20, account_id="rc")
        assert (own.policy.threshold, own.account_override) == (20, True)
        off = await admin.set_recharge_policy(None, account_id="rc", disable=True)
        assert off.disabled
        with pytest.raises(sdk.InvalidRequest) as bad:
            await admin.set_recharge_policy(0)
        assert set(bad.value.field_violations) == {"policy.threshold"}

    def run() -> pb.GetRechargePolicyResponse:
        with sdk.Client(address(app), tenant.admin.key) as client:
            client.set_recharge_policy(None, account_id="rc")  # the tenant's applies again
            return client.get_recharge_policy("rc")

    got = await asyncio.to_thread(run)
    assert (got.policy.threshold, got.account_override, got.disabled) == (100, False, False)


def test_sync_and_async_clients_offer_the_same_methods() -> None:
    def public(cls: type) -> set[str]:
        return {n for n in vars(cls) if not n.startswith("_")}

    assert public(sdk.Client) == public(sdk.AsyncClient)


def test_the_sync_client_is_generated_from_the_async_one() -> None:
    """client/sync.py is what scripts/gen-sync-client (unasync) makes of client/aio.py now."""
    root = pathlib.Path(__file__).resolve().parent.parent
    check = subprocess.run(
        [sys.executable, str(root / "scripts" / "gen-sync-client"), "--check"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr


# --- live: call sessions (need StartSession/UpdateSession/EndSession on the server) ----
async def _time_feature(client: sdk.AsyncClient) -> None:
    """A time feature billed per second at 1 credit, so credits equal seconds."""
    await client.set_rate("call", 1, unit="time", billing_increment=1)


async def test_async_session_reports_before_the_quota_runs_out_and_ends_with_the_seconds_used(
    aclient: sdk.AsyncClient,
) -> None:
    await _time_feature(aclient)
    await aclient.grant("caller", 100)
    async with aclient.session("caller", "call", requested_seconds=2) as session:
        assert session.remaining_seconds <= 2
        await asyncio.sleep(3.3)
        assert not session.must_end.is_set()  # updates kept the quota coming
    end = session.end_response
    assert end is not None
    assert end.session.state == pb.SESSION_STATE_ENDED
    assert session.meter.sequence >= 2  # at least one update (due at ~1.6 s), then the end
    assert end.session.sequence == session.meter.sequence
    used = session.meter.reported_seconds
    assert used in (4, 5)  # ceil of the ~3.3 s the call lasted, rounded up once
    assert end.session.used_seconds == used
    usage = await aclient.get_usage("caller")
    assert [(f.feature, f.credits) for f in usage.features] == [("call", used)]
    balance = await aclient.get_balance("caller")
    assert (balance.balance, balance.reserved) == (100 - used, 0)


async def test_sync_session_final_unit_tells_the_call_to_end(app: App, tenant: Tenant) -> None:
    async with sdk.AsyncClient(address(app), tenant.admin.key) as client:
        await _time_feature(client)
        await client.grant("short", 3)
    told: list[float] = []

    def call() -> tuple[bool, float, sdk.CallSession]:
        with (
            sdk.Client(address(app), tenant.meter.key) as c,
            c.session(
                "short", "call", requested_seconds=10,
                on_final_unit=lambda s: told.append(s.remaining_seconds),
            ) as session,
        ):  # fmt: skip
            started = time.monotonic()
            ended = session.wait(timeout=6)
            return ended, time.monotonic() - started, session

    ended, waited, session = await asyncio.to_thread(call)
    assert session.final_unit
    assert len(told) == 1 and 0 < told[0] <= 3
    assert ended and 2 <= waited <= 4  # the 3 s the balance paid for
    assert session.end_response is not None
    assert session.end_response.session.state == pb.SESSION_STATE_ENDED
    balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="short"))
    assert (balance.balance, balance.reserved) == (0, 0)


# --- the session helper's side of the protocol, against a scripted server --------------
# Until the server implements sessions, this checks what the helper sends (sequence
# numbers, seconds, timing, a resend after a failure) against a Credits servicer that
# answers from a script and records every request. It stands in for nothing the live
# tests above do not also check once the server has sessions.
class ScriptedSessions(pb_grpc.CreditsServicer):
    def __init__(self, quotas: list[tuple[int, bool]], fail_updates: int = 0) -> None:
        self.quotas = quotas  # (granted_seconds, final_unit) for Start, then each update
        self.fail_updates = fail_updates
        self.log: list[tuple[float, str, int, int]] = []  # (monotonic, rpc, sequence, used)

    def _answer(self) -> tuple[int, bool, Timestamp]:
        granted, final = self.quotas.pop(0) if len(self.quotas) > 1 else self.quotas[0]
        valid_until = Timestamp()
        valid_until.FromNanoseconds(time.time_ns() + granted * 1_000_000_000)
        return granted, final, valid_until

    async def StartSession(self, request: Any, context: Any) -> pb.StartSessionResponse:
        self.log.append((time.monotonic(), "start", 0, 0))
        granted, final, valid_until = self._answer()
        return pb.StartSessionResponse(
            granted_seconds=granted, final_unit=final, valid_until=valid_until
        )

    async def UpdateSession(self, request: Any, context: Any) -> pb.UpdateSessionResponse:
        self.log.append((time.monotonic(), "update", request.sequence, request.used_seconds))
        if self.fail_updates:
            self.fail_updates -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted failure")
        granted, final, valid_until = self._answer()
        return pb.UpdateSessionResponse(
            granted_seconds=granted, final_unit=final, valid_until=valid_until
        )

    async def EndSession(self, request: Any, context: Any) -> pb.EndSessionResponse:
        self.log.append((time.monotonic(), "end", request.sequence, request.used_seconds))
        return pb.EndSessionResponse(session=pb.Session(state=pb.SESSION_STATE_ENDED))


@contextlib.asynccontextmanager
async def scripted(servicer: ScriptedSessions) -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_CreditsServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_session_helper_reports_in_sequence_before_each_quota_runs_out() -> None:
    servicer = ScriptedSessions([(2, False)], fail_updates=1)
    async with (
        scripted(servicer) as target,
        sdk.AsyncClient(target, "k", retry=FAST_RETRY) as client,
    ):
        async with client.session("a", "call", requested_seconds=2) as session:
            # Reports fall ~1.6 s after each answer: at ~1.6 s (failed, sent again) and
            # ~3.25 s. The call lasts long enough for the second on a loaded machine too
            # (it once ended at 3.3 s, before the second report went out).
            await asyncio.sleep(4.2)
        elapsed = time.monotonic() - servicer.log[0][0]

    rpcs = [(rpc, seq, used) for _, rpc, seq, used in servicer.log]
    assert rpcs[0] == ("start", 0, 0)
    assert rpcs[-1][0] == "end"
    updates = rpcs[1:-1]
    # The failed first update was sent again unchanged (same sequence, same seconds).
    assert updates[0] == updates[1] and updates[0][1] == 1
    unique = list(dict.fromkeys(updates))
    assert [seq for _, seq, _ in unique] == list(range(1, len(unique) + 1))
    assert len(unique) >= 2
    assert rpcs[-1][1] == len(unique) + 1  # the end follows the last update
    total = sum(used for _, _, used in unique) + rpcs[-1][2]
    assert total == session.meter.reported_seconds
    assert elapsed - 1 < total <= elapsed + 1  # the call's length, rounded up once
    # Every report came before the previous quota (2 s from its answer) ran out.
    times = [t for t, rpc, _, _ in servicer.log if rpc != "end"]
    assert all(later - earlier < 2 for earlier, later in itertools.pairwise(times))


async def test_session_helper_final_unit_stops_reports_and_sets_must_end() -> None:
    servicer = ScriptedSessions([(2, False), (1, True)])
    told: list[float] = []
    async with (
        scripted(servicer) as target,
        sdk.AsyncClient(target, "k", retry=FAST_RETRY) as client,
    ):
        session = client.session(
            "a", "call", requested_seconds=2, on_final_unit=lambda s: told.append(1.0)
        )
        async with session:
            started = time.monotonic()
            await asyncio.wait_for(session.wait(), timeout=5)
            waited = time.monotonic() - started
            assert session.final_unit
            assert session.remaining_seconds == 0
    assert told == [1.0]
    assert 2.0 <= waited <= 3.2  # first update at ~1.6 s, then 1 s of final quota
    rpcs = [rpc for _, rpc, _, _ in servicer.log]
    assert rpcs == ["start", "update", "end"]  # nothing asked after the final unit


async def test_sync_session_helper_reports_and_ends_from_its_thread() -> None:
    servicer = ScriptedSessions([(2, False), (2, False), (1, True)])
    told: list[str] = []

    def call() -> tuple[bool, sdk.CallSession]:
        with (
            sdk.Client(target, "k", retry=FAST_RETRY) as client,
            client.session("a", "call", on_final_unit=lambda s: told.append(s.session_id)) as s,
        ):
            return s.wait(timeout=6), s

    async with scripted(servicer) as target:
        ended, session = await asyncio.to_thread(call)
    assert ended and session.final_unit
    assert told == [session.session_id]
    rpcs = [(rpc, seq) for _, rpc, seq, _ in servicer.log]
    assert rpcs == [("start", 0), ("update", 1), ("update", 2), ("end", 3)]
    used = sum(u for _, rpc, _, u in servicer.log)
    assert used == session.meter.reported_seconds and 4 <= used <= 5  # ~1.6 + 1.6 + 1 s
