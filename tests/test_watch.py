"""WatchBalance: balance alerts from the outboxes, resume tokens, retention, shutdown.

The server runs on a Redis database of this module's own (emptied around each test), so a
test can trim the outboxes with a flusher of its own without touching other tests' data.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis.asyncio as aioredis

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.constants import MAX_CREDITS, WATCH_RETENTION_S
from creditmeter.domain.alerts import (
    AlertKind,
    ResumePoint,
    balance_change,
    crossings,
    watch_scope,
)
from creditmeter.domain.clock import ManualClock
from creditmeter.errors import InvalidRequest
from creditmeter.storage import layout
from creditmeter.storage.entries import events as entry_events
from creditmeter.storage.layout import bucket_of, outbox_key, trimmed_key
from creditmeter.storage.ledger.flusher import Flusher
from creditmeter.storage.outbox import OutboxReader
from creditmeter.storage.redis_client import cluster_seeds, connect, is_cluster_url
from creditmeter.transport.server import App, Settings
from tests.conftest import Caller, Tenant, empty_redis, make_tenant, private_redis, rid
from tests.helpers import Failure, failure

#: Every test here runs on a single Redis and on a Redis Cluster (tests/conftest.py).
ON_CLUSTER = True
PRIVATE_REDIS_DB = 8
#: The API promises an alert within a second of the change.
ALERT_WITHIN_S = 1.0

LOW = pb.BALANCE_ALERT_KIND_LOW
DEPLETED = pb.BALANCE_ALERT_KIND_DEPLETED
TOPPED_UP = pb.BALANCE_ALERT_KIND_TOPPED_UP


@pytest.fixture
def private_redis_url(redis_url: str) -> Iterator[str]:
    url = private_redis(redis_url, PRIVATE_REDIS_DB)
    yield url
    empty_redis(url)


def settings(url: str, tmp_path: Path, clock: ManualClock, **extra: Any) -> Settings:
    return Settings(
        listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        redis_url=url,
        clock=clock,
        shutdown_grace_s=5.0,
        flusher=False,
        **extra,
    )


@pytest.fixture
async def app(private_redis_url: str, tmp_path: Path, clock: ManualClock) -> AsyncIterator[App]:
    """The server in-process, without a flusher: tests flush and trim themselves."""
    server = App(settings(private_redis_url, tmp_path, clock))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def client(private_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = cast(aioredis.Redis, connect(private_redis_url))
    yield c
    await c.aclose()


# --- helpers ---------------------------------------------------------------------------------
Watch = Any  # grpc.aio.UnaryStreamCall[WatchBalanceRequest, WatchBalanceResponse]


async def watch(who: Caller, **request: Any) -> Watch:
    """Start a watch and wait until it is in place (its headers arrive then)."""
    call = who.WatchBalance(pb.WatchBalanceRequest(**request))
    await call.initial_metadata()
    return call


async def next_alert(call: Watch, within_s: float = ALERT_WITHIN_S) -> pb.WatchBalanceResponse:
    message = await asyncio.wait_for(call.read(), within_s)
    assert message is not grpc.aio.EOF, "the watch ended"
    return cast(pb.WatchBalanceResponse, message)


async def watch_fails(who: Caller, **request: Any) -> Failure:
    call = who.WatchBalance(pb.WatchBalanceRequest(**request))
    try:
        await asyncio.wait_for(call.read(), 5)
    except grpc.aio.AioRpcError as error:
        return failure(error)
    raise AssertionError("the watch started but was expected to fail")


def short(a: pb.WatchBalanceResponse) -> tuple[int, str, int, int, int]:
    return a.kind, a.account_id, a.threshold, a.previous_balance, a.balance


async def grant(t: Tenant, account: str, amount: int, **kw: Any) -> pb.GrantResponse:
    return cast(
        pb.GrantResponse,
        await t.admin.Grant(
            pb.GrantRequest(account_id=account, amount=amount, request_id=rid(), **kw)
        ),
    )


async def consume(t: Tenant, account: str, amount: int) -> pb.ConsumeResponse:
    return cast(
        pb.ConsumeResponse,
        await t.meter.Consume(
            pb.ConsumeRequest(account_id=account, feature="text", amount=amount, request_id=rid())
        ),
    )


async def grant_txn(client: aioredis.Redis, tenant: str, account: str, lot_id: str) -> str:
    """The transaction of a grant, from its outbox event (GrantResponse has no txn id)."""
    entries = await client.xrange(outbox_key(bucket_of(tenant, account)))
    return next(
        f["txn"]
        for _id, fields in entries
        for f in entry_events(fields)
        if f["kind"] == "grant" and f["lot"] == lot_id
    )


async def flush_all(flusher: Flusher) -> None:
    await flusher.ensure_groups()
    for _ in range(100):
        await flusher.flush_once()
        if await flusher.backlog() == 0:
            return
    raise AssertionError("the outboxes did not drain")


# --- the rules, without a server -------------------------------------------------------------
def test_crossings_follow_the_balance_in_order() -> None:
    th = (10, 50, 90)
    assert crossings(100, 5, th) == [
        (AlertKind.LOW, 90), (AlertKind.LOW, 50), (AlertKind.LOW, 10)
    ]  # fmt: skip
    assert crossings(100, 0, th) == [
        (AlertKind.LOW, 90), (AlertKind.LOW, 50), (AlertKind.LOW, 10), (AlertKind.DEPLETED, 0)
    ]  # fmt: skip
    assert crossings(0, 60, th) == [
        (AlertKind.TOPPED_UP, 0), (AlertKind.TOPPED_UP, 10), (AlertKind.TOPPED_UP, 50)
    ]  # fmt: skip
    # Landing exactly on a threshold is LOW; leaving it upwards is TOPPED_UP.
    assert crossings(51, 50, th) == [(AlertKind.LOW, 50)]
    assert crossings(50, 51, th) == [(AlertKind.TOPPED_UP, 50)]
    # Moves that cross nothing, and zero to zero.
    assert crossings(49, 11, th) == []
    assert crossings(11, 49, th) == []
    assert crossings(0, 0, th) == []
    assert crossings(5, 5, th) == []


def test_resume_token_round_trip_and_refusals() -> None:
    point = ResumePoint(watch_scope("t", ""), {b: f"{1_700_000_000_000 + b}-{b}" for b in
                                               range(layout.buckets())}, (3, 2))  # fmt: skip
    token = point.encode()
    assert ResumePoint.decode(token) == point
    assert len(token) < 1000  # a tenant-wide token stays small
    for bad in ("x", "!!!!", token[:-5], token + "A", "A" * 5000,
                ResumePoint(1, {99: "1-0"}).encode(), ResumePoint(1, {1: "1-x"}).encode(),
                ResumePoint(1, {1: "1-0"}, (2, 1)).encode()):  # fmt: skip
        with pytest.raises(InvalidRequest) as refused:
            ResumePoint.decode(bad)
        assert [f for f, _ in refused.value.violations] == ["resume_token"], bad


# --- alerts of one account -------------------------------------------------------------------
async def test_account_watch_low_depleted_topped_up(tenant: Tenant, client: aioredis.Redis) -> None:
    await grant(tenant, "alice", 100)
    w = await watch(tenant.read, account_id="alice", thresholds=[50, 20, 50])
    c1 = await consume(tenant, "alice", 60)  # 100 -> 40: below 50
    started = time.monotonic()
    a = await next_alert(w)
    assert time.monotonic() - started < ALERT_WITHIN_S
    assert short(a) == (LOW, "alice", 50, 100, 40)
    assert a.transaction_id == c1.transaction_id and a.resume_token
    assert a.event_time == c1.consume_time
    await consume(tenant, "alice", 10)  # 40 -> 30: crosses nothing
    c3 = await consume(tenant, "alice", 30)  # 30 -> 0: below 20, and empty
    low, depleted = await next_alert(w), await next_alert(w)
    assert short(low) == (LOW, "alice", 20, 30, 0)
    assert short(depleted) == (DEPLETED, "alice", 0, 30, 0)
    assert low.transaction_id == depleted.transaction_id == c3.transaction_id
    g = await grant(tenant, "alice", 30)  # 0 -> 30: above zero and 20, not 50
    txn = await grant_txn(client, tenant.name, "alice", g.lot.lot_id)
    up0, up20 = await next_alert(w), await next_alert(w)
    assert short(up0) == (TOPPED_UP, "alice", 0, 0, 30)
    assert short(up20) == (TOPPED_UP, "alice", 20, 0, 30)
    assert up0.transaction_id == up20.transaction_id == txn
    w.cancel()


async def test_alert_reports_the_whole_transaction(tenant: Tenant) -> None:
    """A charge spanning two lots appends two events; the alert has the balance before and
    after the charge, not the intermediate one no reader could ever see."""
    await grant(tenant, "bob", 7, priority=1)
    await grant(tenant, "bob", 100)
    w = await watch(tenant.read, account_id="bob", thresholds=[100, 104])
    c = await consume(tenant, "bob", 10)  # 107 -> 97, 7 from the first lot and 3 from the second
    assert len(c.charges) == 2
    assert [short(await next_alert(w)) for _ in range(2)] == [
        (LOW, "bob", 104, 107, 97),
        (LOW, "bob", 100, 107, 97),
    ]
    w.cancel()


async def test_unlimited_account_and_other_accounts_do_not_alert(tenant: Tenant) -> None:
    await grant(tenant, "carol", 10)
    await grant(tenant, "dave", 10)
    w = await watch(tenant.read, account_id="carol", thresholds=[5])
    await tenant.admin.SetAccountOptions(
        pb.SetAccountOptionsRequest(account_id="carol", unlimited=True, request_id=rid())
    )
    await consume(tenant, "carol", 50)  # unlimited: no balance change
    await consume(tenant, "dave", 8)  # another account
    await tenant.admin.SetAccountOptions(
        pb.SetAccountOptionsRequest(account_id="carol", unlimited=False, request_id=rid())
    )
    c = await consume(tenant, "carol", 6)  # 10 -> 4: the first alert of this watch
    a = await next_alert(w)
    assert short(a) == (LOW, "carol", 5, 10, 4) and a.transaction_id == c.transaction_id
    w.cancel()


async def test_unlimited_account_does_not_alert_on_grants(tenant: Tenant) -> None:
    """An unlimited account's balance reads -1 whatever it is granted: no alert (a grant
    once alerted TOPPED_UP from its credit in lots)."""
    await tenant.admin.SetAccountOptions(
        pb.SetAccountOptionsRequest(account_id="uma", unlimited=True, request_id=rid())
    )
    w = await watch(tenant.read, account_id="uma", thresholds=[5])
    assert (await grant(tenant, "uma", 10)).balance == -1
    await tenant.admin.SetAccountOptions(
        pb.SetAccountOptionsRequest(account_id="uma", unlimited=False, request_id=rid())
    )
    c = await consume(tenant, "uma", 6)  # 10 -> 4: the first alert of this watch
    a = await next_alert(w)
    assert short(a) == (LOW, "uma", 5, 10, 4) and a.transaction_id == c.transaction_id
    w.cancel()


# --- alerts follow the spendable balance ------------------------------------------------------
async def start_session(
    t: Tenant, account: str, session: str, **kw: Any
) -> pb.StartSessionResponse:
    return cast(
        pb.StartSessionResponse,
        await t.meter.StartSession(
            pb.StartSessionRequest(account_id=account, session_id=session, feature="voice", **kw)
        ),
    )


async def test_alert_balances_are_what_consume_answered_while_credit_is_held(
    tenant: Tenant,
) -> None:
    """Reserved credit is not spendable: an alert's balances are the spendable ones, as
    the RPCs answer them (once, Consume answered 755 -> 754 and its alert said 757 -> 756)."""
    await grant(tenant, "held", 757)
    w = await watch(tenant.read, account_id="held", thresholds=[754])
    started = await start_session(tenant, "held", "call", requested_seconds=120)  # holds 2
    assert started.balance == 755  # crosses nothing
    c = await consume(tenant, "held", 1)
    assert c.balance == 754
    a = await next_alert(w)
    assert short(a) == (LOW, "held", 754, 755, 754) and a.transaction_id == c.transaction_id
    w.cancel()


async def test_spendable_reaching_zero_through_reservations_is_depleted(tenant: Tenant) -> None:
    await grant(tenant, "dee", 5)
    w = await watch(tenant.read, account_id="dee", thresholds=[3])
    # A session holding 3 of 5: the spendable balance falls 5 -> 2.
    started = await start_session(tenant, "dee", "call")
    assert started.balance == 2
    assert short(await next_alert(w)) == (LOW, "dee", 3, 5, 2)
    # Spending the rest of what is not held depletes the account, held credit or not.
    c = await consume(tenant, "dee", 2)
    assert c.balance == 0
    a = await next_alert(w)
    assert short(a) == (DEPLETED, "dee", 0, 2, 0) and a.transaction_id == c.transaction_id
    # Ending the call charges one increment and gives back the other two held: 0 -> 2.
    ended = await tenant.meter.EndSession(
        pb.EndSessionRequest(account_id="dee", session_id="call", sequence=1, used_seconds=30)
    )
    assert (ended.charged_amount, ended.released_amount, ended.balance) == (1, 2, 2)
    assert short(await next_alert(w)) == (TOPPED_UP, "dee", 0, 0, 2)
    # A session that holds everything spendable depletes it by itself.
    again = await start_session(tenant, "dee", "again")
    assert (again.session.reserved_amount, again.balance) == (2, 0)
    assert short(await next_alert(w)) == (DEPLETED, "dee", 0, 2, 0)
    w.cancel()


async def test_reader_completes_a_transaction_cut_by_its_read_count(
    tenant: Tenant, client: aioredis.Redis
) -> None:
    """A read that stops at its count inside a transaction fetches the rest of it: the
    alert must see the whole transaction, and the position must not split it."""
    await grant(tenant, "kim", 3, priority=1)
    await grant(tenant, "kim", 3, priority=2)
    await grant(tenant, "kim", 100)
    bucket = bucket_of(tenant.name, "kim")
    reader = OutboxReader(client, [bucket], block_ms=100, count=2)
    start = await reader.ends()
    c = await consume(tenant, "kim", 10)  # three lots: three consume events, then the request
    assert len(c.charges) == 3
    [txn] = await reader.read(start)
    assert txn.txn == c.transaction_id and txn.account == "kim"
    assert [e["kind"] for e in txn.events] == ["consume", "consume", "consume", "request"]
    assert balance_change(txn.events) == (106, 96)
    assert await reader.read({bucket: txn.last_id}) == []  # nothing after it


# --- a whole tenant --------------------------------------------------------------------------
async def test_tenant_watch_sees_every_account_and_no_other_tenant(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    accounts = [f"acct-{i}" for i in range(6)]  # spread over several buckets
    assert len({bucket_of(tenant.name, a) for a in accounts}) > 1
    for account in accounts:
        await grant(tenant, account, 10)
        await grant(other_tenant, account, 10)
    w = await watch(tenant.read, thresholds=[5])
    for account in accounts:
        await consume(other_tenant, account, 6)  # the same names, another tenant
        await consume(tenant, account, 6)
    got = [short(await next_alert(w)) for _ in accounts]
    assert sorted(got) == sorted((LOW, a, 5, 10, 4) for a in accounts)
    # Nothing else is queued: the next alert is a later change of this tenant.
    await consume(other_tenant, accounts[0], 4)
    await consume(tenant, accounts[0], 4)
    assert short(await next_alert(w)) == (DEPLETED, accounts[0], 0, 4, 0)
    w.cancel()


# --- resuming --------------------------------------------------------------------------------
async def test_resume_receives_exactly_the_missed_alerts(tenant: Tenant) -> None:
    await grant(tenant, "erin", 100)
    w = await watch(tenant.read, account_id="erin", thresholds=[80, 60, 40])
    await consume(tenant, "erin", 30)  # 100 -> 70
    first = await next_alert(w)
    assert short(first) == (LOW, "erin", 80, 100, 70)
    w.cancel()
    # Missed while away: one alert, then two in one transaction, then a top-up.
    await consume(tenant, "erin", 5)  # 70 -> 65: nothing
    await consume(tenant, "erin", 10)  # 65 -> 55: LOW 60
    await consume(tenant, "erin", 55)  # 55 -> 0: LOW 40, DEPLETED
    await grant(tenant, "erin", 50)  # 0 -> 50: TOPPED_UP 0, 40
    missed = [
        (LOW, "erin", 60, 65, 55),
        (LOW, "erin", 40, 55, 0),
        (DEPLETED, "erin", 0, 55, 0),
        (TOPPED_UP, "erin", 0, 0, 50),
        (TOPPED_UP, "erin", 40, 0, 50),
    ]
    again = await watch(tenant.read, account_id="erin", thresholds=[80, 60, 40],
                        resume_token=first.resume_token)  # fmt: skip
    alerts = [await next_alert(again) for _ in missed]
    assert [short(a) for a in alerts] == missed
    await consume(tenant, "erin", 50)  # 50 -> 0: the next ones are new, nothing repeated
    assert short(await next_alert(again)) == (LOW, "erin", 40, 50, 0)
    assert short(await next_alert(again)) == (DEPLETED, "erin", 0, 50, 0)
    again.cancel()

    # Every token resumes right after its own alert, also in the middle of a transaction.
    for i, alert in enumerate(alerts):
        resumed = await watch(tenant.read, account_id="erin", thresholds=[80, 60, 40],
                              resume_token=alert.resume_token)  # fmt: skip
        rest = [*missed[i + 1 :], (LOW, "erin", 40, 50, 0), (DEPLETED, "erin", 0, 50, 0)]
        assert [short(await next_alert(resumed)) for _ in rest] == rest, i
        resumed.cancel()


async def test_tenant_watch_resumes_across_buckets(tenant: Tenant) -> None:
    accounts = [f"acct-{i}" for i in range(4)]
    for account in accounts:
        await grant(tenant, account, 10)
    w = await watch(tenant.read, thresholds=[5])
    await consume(tenant, accounts[0], 6)
    first = await next_alert(w)
    w.cancel()
    for account in accounts[1:]:
        await consume(tenant, account, 6)
    again = await watch(tenant.read, thresholds=[5], resume_token=first.resume_token)
    got = [short(await next_alert(again)) for _ in accounts[1:]]
    assert sorted(got) == sorted((LOW, a, 5, 10, 4) for a in accounts[1:])
    await consume(tenant, accounts[0], 4)
    assert short(await next_alert(again)) == (DEPLETED, accounts[0], 0, 4, 0)
    again.cancel()
    # A tenant-wide token does not resume an account watch, nor another tenant's.
    f = await watch_fails(tenant.read, account_id=accounts[0], resume_token=first.resume_token)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and "resume_token" in f.violations


# --- retention and expired tokens ------------------------------------------------------------
async def test_expired_token_is_out_of_range(
    app: App, tenant: Tenant, client: aioredis.Redis
) -> None:
    assert app.ledger is not None
    await grant(tenant, "fay", 100)
    w = await watch(tenant.read, account_id="fay", thresholds=[50])
    await consume(tenant, "fay", 60)
    token = (await next_alert(w)).resume_token
    w.cancel()
    no_window = Flusher(client, app.ledger, consumer="test", retention_ms=0)

    # Trimming what the token already covers does not expire it.
    await flush_all(no_window)
    await no_window.trim()
    await consume(tenant, "fay", 40)
    resumed = await watch(tenant.read, account_id="fay", thresholds=[50], resume_token=token)
    assert short(await next_alert(resumed)) == (DEPLETED, "fay", 0, 40, 0)
    resumed.cancel()

    # Trimming entries after it does: they can no longer be sent. (A trim keeps the last
    # entry read: a change after the token's, the 40, has to be followed by another.)
    await grant(tenant, "fay", 5)
    await flush_all(no_window)
    await no_window.trim()
    assert await client.get(trimmed_key(bucket_of(tenant.name, "fay")))
    f = await watch_fails(tenant.read, account_id="fay", thresholds=[50], resume_token=token)
    assert f.code == grpc.StatusCode.OUT_OF_RANGE, f
    assert f.reason == "RESUME_TOKEN_EXPIRED" and f.domain == "creditmeter"
    assert f.metadata == {"retention_seconds": str(WATCH_RETENTION_S)}


async def test_flusher_keeps_flushed_entries_for_the_window_and_never_unflushed_ones(
    app: App, tenant: Tenant, client: aioredis.Redis
) -> None:
    assert app.ledger is not None
    stream = outbox_key(bucket_of(tenant.name, "gil"))
    await grant(tenant, "gil", 100)
    for _ in range(3):
        await consume(tenant, "gil", 1)
    flushed = [i for i, _ in await client.xrange(stream)]
    window_ms = 1500
    flusher = Flusher(client, app.ledger, consumer="test", retention_ms=window_ms)
    await flush_all(flusher)
    await flusher.trim()
    assert [i for i, _ in await client.xrange(stream)] == flushed  # inside the window: kept

    await asyncio.sleep(window_ms / 1000 + 0.2)
    for _ in range(3):
        await consume(tenant, "gil", 1)  # not flushed
    unflushed = [i for i, _ in await client.xrange(stream)][len(flushed) :]
    assert unflushed
    await flusher.trim()
    left = [i for i, _ in await client.xrange(stream)]
    # Past the window, the flushed entries go (but the last delivered one, the trim bound);
    # the unflushed ones all stay, even with no window at all.
    assert left == flushed[-1:] + unflushed
    await Flusher(client, app.ledger, consumer="test", retention_ms=0).trim()
    assert [i for i, _ in await client.xrange(stream)] == left
    assert await flusher.backlog() == len(unflushed)


# --- invalid requests and keys --------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"account_id": "{bad}"}, "account_id"),
        ({"account_id": "x" * 129}, "account_id"),
        ({"thresholds": [0]}, "thresholds[0]"),
        ({"thresholds": [5, -1]}, "thresholds[1]"),
        ({"thresholds": [MAX_CREDITS + 1]}, "thresholds[0]"),
        ({"thresholds": list(range(1, 18))}, "thresholds"),
        ({"resume_token": "not-a-token"}, "resume_token"),
        ({"resume_token": ResumePoint(1, {0: "1-0"}).encode()}, "resume_token"),
    ],
)
async def test_invalid_watch_requests(
    tenant: Tenant, request_fields: dict[str, Any], field: str
) -> None:
    f = await watch_fails(tenant.read, **request_fields)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT, f
    assert f.reason == "INVALID_REQUEST"
    assert field in f.violations, f.violations


async def test_sixteen_thresholds_and_duplicates_are_fine(tenant: Tenant) -> None:
    await grant(tenant, "hal", 100)
    w = await watch(tenant.read, account_id="hal", thresholds=[*range(1, 17), 16, 16])
    await consume(tenant, "hal", 85)  # 100 -> 15: below 16 once
    assert short(await next_alert(w)) == (LOW, "hal", 16, 100, 15)
    w.cancel()


@pytest.mark.parametrize("role", ["read", "meter", "admin"])
async def test_every_role_may_watch_and_keys_are_checked(tenant: Tenant, role: str) -> None:
    who = {"read": tenant.read, "meter": tenant.meter, "admin": tenant.admin}[role]
    await grant(tenant, "ivy", 10)
    w = await watch(who, account_id="ivy")
    await consume(tenant, "ivy", 10)
    assert short(await next_alert(w)) == (DEPLETED, "ivy", 0, 10, 0)
    w.cancel()
    for header in (None, "Bearer garbage", f"Bearer {who.key}x"):
        metadata = None if header is None else (("authorization", header),)
        call = tenant.stub.WatchBalance(pb.WatchBalanceRequest(), metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(call.read(), 5)
        f = failure(refused.value)
        assert (f.code, f.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")


# --- ending ------------------------------------------------------------------------------------
async def watch_connections(url: str) -> int:
    """Connections to this database whose last command was a watcher's XREAD (on every
    node of a cluster)."""
    if is_cluster_url(url):
        nodes = [
            aioredis.Redis(host=h, port=p, decode_responses=True) for h, p in cluster_seeds(url)
        ]
        db = "0"
    else:
        nodes = [aioredis.Redis.from_url(url, decode_responses=True)]
        db = str(PRIVATE_REDIS_DB)
    found = 0
    for node in nodes:
        try:
            clients = await node.client_list()
        finally:
            await node.aclose()
        found += sum(1 for c in clients if c["cmd"] == "xread" and c["db"] == db)
    return found


async def test_cancelled_watch_releases_its_connection(
    tenant: Tenant, private_redis_url: str
) -> None:
    watches = [await watch(tenant.read, account_id=f"j{i}") for i in range(3)]
    assert await watch_connections(private_redis_url) == 3  # one dedicated connection each
    for w in watches:
        w.cancel()
    for _ in range(40):  # up to 2 s
        if not await watch_connections(private_redis_url):
            break
        await asyncio.sleep(0.05)
    assert await watch_connections(private_redis_url) == 0


async def test_server_stop_ends_watches_promptly(
    private_redis_url: str, tmp_path: Path, clock: ManualClock
) -> None:
    server = App(settings(private_redis_url, tmp_path, clock))
    await server.start()
    t = await make_tenant(server)
    try:
        w = await watch(t.read, thresholds=[5])
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 2.0  # well within the 5 s grace
        assert await asyncio.wait_for(w.read(), 1) is grpc.aio.EOF
        assert await w.code() == grpc.StatusCode.OK
        assert await watch_connections(private_redis_url) == 0
    finally:
        await t.channel.close()
