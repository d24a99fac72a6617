"""Faults around the durable ledger, each on both ledger backends (SQLite in the data
directory, and PostgreSQL):

1. a flusher killed between the ledger commit and XACK, then restarted (own pending list)
   or replaced by a peer (XAUTOCLAIM): every outbox event lands exactly once;
2. `kill -9` of the real server while clients retry their request ids across the crash;
3. Redis wiped (FLUSHALL) and `creditmeter rebuild` from the ledger;
4. the ledger unavailable until the outbox backlog reaches the cap, then restored;
5. staged (ledger-first) grants whose Redis step failed, finished by the reconciler.

The in-process server here (`app`, overriding conftest's) runs on a Redis database of its
own, emptied around each test, so its outboxes and consumer group hold this test's entries
only (the other tests leave unflushed entries in database 0), and on the parametrized
ledger (for PostgreSQL, a database of its own on the session's server; see
`ledger_url`). Everything is still compared per tenant.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import grpc
import pytest
import redis
import redis.asyncio as aioredis
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.constants import (
    CONFIG_DB_NAME,
    FLUSH_GROUP,
    LEDGER_HEALTH_SERVICE,
    LEDGER_RETRY_INITIAL_S,
    LEDGER_RETRY_MAX_S,
    LEDGER_RETRY_MULTIPLIER,
    STAGED_GRANT_RETRY_AFTER_MS,
)
from creditmeter.domain.clock import ManualClock
from creditmeter.domain.recovery import AccountState, Recovery, replay
from creditmeter.errors import BackendUnavailable
from creditmeter.storage import layout, scripts
from creditmeter.storage.config_store.sqlite import SqliteConfigStore
from creditmeter.storage.entries import events as entry_events
from creditmeter.storage.layout import AccountKeys, outbox_key
from creditmeter.storage.ledger import open_ledger
from creditmeter.storage.ledger.base import UNAVAILABLE_MESSAGE, Event, Ledger, RequestRecord
from creditmeter.storage.ledger.flusher import Flusher
from creditmeter.storage.redis_client import connect
from creditmeter.storage.redis_store import Call, RedisStore
from creditmeter.transport.server import App, Settings
from tests import test_server_process
from tests.conftest import (
    Tenant,
    another_server,
    empty_redis,
    private_redis,
    rid,
    tenant_keys,
    tenant_of,
)
from tests.helpers import Failure, fails, failure
from tests.pg import PostgresServer, find_bindir
from tests.test_server_process import (
    CREDITS_SERVICE,
    ENV,
    Launch,
    Metadata,
    auth,
    balance,
    children,
    cli,
    create_key,
    eventually,
    processes_using,
    rejected,
)

#: `creditmeter serve` children on a data dir, every one killed at teardown.
launch = test_server_process.launch

#: The Redis database (of the session's redis-server) the in-process server uses here.
#: Every test here runs on a single Redis and on a Redis Cluster (tests/conftest.py).
ON_CLUSTER = True
PRIVATE_REDIS_DB = 7
T = TypeVar("T")


# --- fixtures ----------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest) -> str | None:
    """None: the default SQLite ledger in the data dir. Or a fresh database on the
    session's PostgreSQL server: not the shared one, because the reconciler (every 2 s)
    and `rebuild` act on every staged grant and account in the ledger, whatever the
    tenant, and would pull other tests' rows into this test's Redis."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"faults_{uuid.uuid4().hex[:12]}"
    server.create_database(name)
    return server.url(name)


@pytest.fixture
def private_redis_url(redis_url: str) -> Iterator[str]:
    """A database of the session's redis-server that only this module uses, emptied
    before and after each test."""
    url = private_redis(redis_url, PRIVATE_REDIS_DB)
    yield url
    empty_redis(url)


@pytest.fixture
async def app(
    request: pytest.FixtureRequest,
    ledger_url: str | None,
    private_redis_url: str,
    tmp_path: Path,
    clock: ManualClock,
) -> AsyncIterator[App]:
    """conftest's in-process server (flusher only when marked `flusher`), on the
    parametrized ledger and a Redis database of its own."""
    marker = request.node.get_closest_marker("flusher")
    server = App(
        Settings(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "data",
            redis_url=private_redis_url,
            ledger_url=ledger_url,
            clock=clock,
            shutdown_grace_s=1.0,
            flusher=marker is not None,
            **(marker.kwargs if marker else {}),
        )
    )
    await server.start()
    yield server
    await server.stop()


# --- helpers -----------------------------------------------------------------------------
def fresh_tenant() -> str:
    return f"k{uuid.uuid4().hex[:12]}"


def server_env(ledger_url: str | None) -> dict[str, str]:
    """The environment of a `creditmeter` child: --ledger-url through its variable."""
    return ENV if ledger_url is None else {**ENV, "CREDITMETER_LEDGER_URL": ledger_url}


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Poll an async check until it holds; the seconds it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def tenant_events(ledger: Ledger, tenant: str) -> list[Event]:
    return [e async for e in ledger.scan(tenant)]


async def read_ledger(url: str | None, data_dir: Path, tenant: str) -> list[Event]:
    """The tenant's events, from the ledger opened directly (beside a running server)."""
    ledger = open_ledger(url, data_dir)
    await ledger.open()
    try:
        return await tenant_events(ledger, tenant)
    finally:
        await ledger.close()


async def ledger_accounts(url: str | None, data_dir: Path, tenant: str) -> dict[str, AccountState]:
    """Every account of the tenant as its ledger events say it is."""
    ledger = open_ledger(url, data_dir)
    await ledger.open()
    try:
        return {s.account: s async for s in replay(ledger.scan(tenant))}
    finally:
        await ledger.close()


def assert_consumes_exactly_once(events: list[Event], acknowledged: dict[str, str]) -> None:
    """Every event id once, every (transaction, lot) charge once, and exactly one consume
    transaction per acknowledged request id (the one the client was given), none other."""
    twice = [k for k, n in Counter(e.event_id for e in events).items() if n > 1]
    assert twice == [], f"events stored more than once: {twice[:5]}"
    consumes = [e for e in events if e.kind == "consume"]
    lines = Counter((e.txn, e.lot) for e in consumes)
    assert [k for k, n in lines.items() if n > 1] == []
    txns: dict[str, set[str]] = defaultdict(set)
    for e in consumes:
        txns[e.request_id].add(e.txn)
    missing = sorted(set(acknowledged) - set(txns))
    extra = sorted(set(txns) - set(acknowledged))
    assert (missing, extra) == ([], []), f"missing {missing[:5]}, unexpected {extra[:5]}"
    wrong = {r: t for r, t in txns.items() if t != {acknowledged[r]}}
    assert wrong == {}, wrong


def audit_ok(data_dir: Path, tenant: str, env: dict[str, str], *extra: str) -> None:
    """`creditmeter audit` of the tenant exits 0 (no drift)."""
    done = cli("audit", "--data-dir", str(data_dir), "--tenant", tenant, *extra, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 with drift" in done.stdout, done.stdout


# --- 1. flusher killed between commit and ack -----------------------------------------
class SimulatedCrash(Exception):
    """Stands for the flusher process dying at this point."""


class _AckFails:
    """A pipeline whose XACK kills the flusher: the batch is in the ledger, unacknowledged."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    async def __aenter__(self) -> _AckFails:
        await self._pipe.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._pipe.__aexit__(*exc)

    def xack(self, *args: object, **kwargs: object) -> None:
        raise SimulatedCrash("killed after the ledger commit, before XACK")

    def fcall(self, function: str, *args: object) -> None:
        """The flusher acknowledges through ack.lua (XACK and the flushed count)."""
        if function == scripts.function_name("ack"):
            raise SimulatedCrash("killed after the ledger commit, before XACK")
        self._pipe.fcall(function, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


class CrashBeforeAck:
    """A Redis client that is real in everything but XACK."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> _AckFails:
        return _AckFails(self._client.pipeline(transaction=transaction, shard_hint=shard_hint))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


async def consume_round(tenant: Tenant, accounts: list[str], count: int) -> None:
    for account in accounts:
        for quantity in range(1, count + 1):
            await tenant.meter.Consume(
                pb.ConsumeRequest(
                    account_id=account, feature="text", quantity=quantity, request_id=rid()
                )
            )


async def pending_by_consumer(client: aioredis.Redis) -> Counter[str]:
    """Entries delivered to each consumer of the group and not acknowledged, all outboxes."""
    pending: Counter[str] = Counter()
    for bucket in range(layout.buckets()):
        with suppress(redis.ResponseError):  # an outbox that never had an entry
            summary = await client.xpending(outbox_key(bucket), FLUSH_GROUP)
            for consumer in summary["consumers"] or []:
                pending[consumer["name"]] += int(consumer["pending"])
    return +pending


async def outbox_entries(client: aioredis.Redis, tenant: str) -> list[dict[str, str]]:
    """The tenant's entries still in the outboxes (a client with decode_responses)."""
    entries: list[dict[str, str]] = []
    for bucket in range(layout.buckets()):
        stream = cast(list[tuple[str, dict[str, str]]], await client.xrange(outbox_key(bucket)))
        entries.extend(
            event
            for _id, fields in stream
            for event in entry_events(fields)
            if event["tenant"] == tenant
        )
    return entries


CLAIM_IDLE_MS = 1500


@pytest.mark.parametrize("recovery", ["restart", "peer_claims"])
async def test_flusher_killed_between_commit_and_ack_delivers_every_event_once(
    app: App, tenant: Tenant, private_redis_url: str, recovery: str
) -> None:
    assert app.ledger is not None and app.redis is not None and app.flusher is None
    ledger = app.ledger
    accounts = ["a", "b", "c"]
    for account in accounts:
        # A small first lot: the charges below span two lots (two consume events each).
        await tenant.admin.Grant(
            pb.GrantRequest(account_id=account, amount=7, priority=1, request_id=rid())
        )
        await tenant.admin.Grant(pb.GrantRequest(account_id=account, amount=1000, request_id=rid()))
    await consume_round(tenant, accounts, 6)

    client = cast(aioredis.Redis, connect(private_redis_url))
    try:
        # Two entries per outbox a read: three reads leave some of each account's eight
        # entries (two grants, six consumes) to read after the crashes.
        # It takes every bucket's lease, for CLAIM_IDLE_MS at a time.
        dying = Flusher(
            cast(aioredis.Redis, CrashBeforeAck(client)), ledger, consumer="fl-a", read_count=2,
            lease_ms=CLAIM_IDLE_MS,
        )  # fmt: skip
        await dying.ensure_groups()
        for _ in range(3):
            with pytest.raises(SimulatedCrash):
                await dying.flush_once()
        committed = await tenant_events(ledger, tenant.name)
        pending = await pending_by_consumer(client)
        assert committed, "the dying flusher committed nothing"
        assert set(pending) == {"fl-a"} and pending["fl-a"] > 0, pending
        stuck = pending["fl-a"]

        await consume_round(tenant, accounts, 4)  # more entries, never delivered yet
        expected = await outbox_entries(client, tenant.name)
        expected_events = {f["event_id"]: f for f in expected if f["kind"] != "request"}
        expected_requests = {f["request_id"] for f in expected if f["kind"] == "request"}
        entries_before = sum([await client.xlen(outbox_key(b)) for b in range(layout.buckets())])

        if recovery == "restart":
            # The same consumer name: it re-reads its own pending entries first.
            # No watchers' window (retention 0): the trim below must go down to the bound.
            # Its leases are still in its name: it takes them back at once.
            flusher = Flusher(
                client, ledger, consumer="fl-a", read_count=5, retention_ms=0,
                lease_ms=CLAIM_IDLE_MS,
            )  # fmt: skip
            await flusher.flush_once()
            left = (await pending_by_consumer(client))["fl-a"]
            assert left < stuck, "the restarted flusher did not re-read its pending entries"
            # They were committed already: re-inserting them changed none of them (the
            # same pass may also have flushed the buckets it had nothing pending in).
            after = {e.event_id: e for e in await tenant_events(ledger, tenant.name)}
            assert all(after[e.event_id] == e for e in committed)
        else:
            # Another flusher: it takes fl-a's buckets, and the entries fl-a read, only
            # once fl-a's leases lapse (fl-a might just be slow), then commits and
            # acknowledges them itself.
            flusher = Flusher(
                client, ledger, consumer="fl-b", read_count=5, retention_ms=0,
                lease_ms=CLAIM_IDLE_MS,
            )  # fmt: skip
            await flusher.ensure_groups()
            assert await flusher.flush_once() == 0  # fl-a holds every bucket still
            assert flusher.buckets() == []
            assert (await pending_by_consumer(client))["fl-a"] == stuck
            assert await tenant_events(ledger, tenant.name) == committed
            await asyncio.sleep(CLAIM_IDLE_MS / 1000 + 0.1)
        for _ in range(100):
            await flusher.flush_once()
            if await flusher.backlog() == 0:
                break
        assert await flusher.backlog() == 0
        assert await pending_by_consumer(client) == Counter()
        await flusher.trim()

        # Every outbox event exactly once, as written, and every request record once.
        events = await tenant_events(ledger, tenant.name)
        assert Counter(e.event_id for e in events) == Counter(expected_events.keys())
        assert {e.event_id: e for e in events} == {
            i: Event.from_fields(f) for i, f in expected_events.items()
        }
        lines = Counter((e.txn, e.lot) for e in events if e.kind == "consume")
        assert set(lines.values()) == {1}
        assert len({txn for txn, _ in lines}) == 30  # 3 accounts x (6 + 4) consumes
        assert len(lines) > 30  # some charges spanned two lots
        requests: list[RequestRecord] = [
            r for r in await ledger.requests_since(0) if r.tenant == tenant.name
        ]
        assert Counter(r.request_id for r in requests) == Counter(expected_requests)

        # Trimmed: each outbox keeps at most its last delivered entry (the trim bound).
        lengths = [await client.xlen(outbox_key(b)) for b in range(layout.buckets())]
        assert max(lengths) <= 1, lengths
        assert sum(lengths) < entries_before
        checked, drifts = await Recovery(ledger, RedisStore(app.redis)).audit(tenant.name, 1.0)
        assert (checked, drifts) == (3, [])
    finally:
        await client.aclose()


# --- 2. kill -9 while clients retry -----------------------------------------------------
CLIENTS = 6
PER_CLIENT = 25
INITIAL = 250  # demand averages 2.5 x 150 = 375 credits: some requests must be refused
#: The server is gone or restarting: retry with the same request id.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


@dataclass
class Router:
    """Where clients send their calls (a restarted server listens on a new port)."""

    address: str
    stop: bool = False


@dataclass
class ClientLog:
    retries: int = 0
    unexpected: list[Failure] = field(default_factory=list)


def run_client(
    plan: list[pb.ConsumeRequest],
    router: Router,
    md: Metadata,
    answers: dict[str, pb.ConsumeResponse | None],
) -> ClientLog:
    """Send each request until it is answered: a response, or INSUFFICIENT_CREDITS (None)."""
    log = ClientLog()
    channel: grpc.Channel | None = None
    address = ""
    try:
        for request in plan:
            while True:
                if router.stop:
                    raise AssertionError("stopped before every request was answered")
                if address != router.address or channel is None:
                    if channel is not None:
                        channel.close()
                    address = router.address
                    channel = grpc.insecure_channel(address)
                stub = pb_grpc.CreditsStub(channel)
                try:
                    answers[request.request_id] = stub.Consume(request, metadata=md, timeout=5)
                    break
                except grpc.RpcError as error:
                    info = failure(cast(grpc.aio.AioRpcError, error))
                    if info.reason == "INSUFFICIENT_CREDITS":
                        answers[request.request_id] = None
                        break
                    if info.code not in RETRYABLE:
                        log.unexpected.append(info)
                    log.retries += 1
                    time.sleep(0.05)
            time.sleep(0.03)
    finally:
        if channel is not None:
            channel.close()
    return log


def wait_flushed(stub: pb_grpc.CreditsStub, md: Metadata, timeout_s: float = 45.0) -> None:
    """Until the server reports an empty backlog. It samples the backlog every 0.2 s: the
    pause first makes the sample newer than the caller's last change."""
    time.sleep(0.5)

    def empty() -> bool:
        status = stub.GetLedgerStatus(pb.GetLedgerStatusRequest(), metadata=md, timeout=5)
        return int(status.backlog) == 0

    eventually(empty, timeout_s, interval_s=0.1)


def test_kill_9_while_clients_retry_their_request_ids(
    launch: Launch, tmp_path: Path, ledger_url: str | None
) -> None:
    data = tmp_path / "data"
    tenant = fresh_tenant()
    key, _ = create_key(data, tenant, "admin")
    md = auth(key)
    env = server_env(ledger_url)
    server = launch(data, env)
    with grpc.insecure_channel(server.address) as channel:
        pb_grpc.CreditsStub(channel).Grant(
            pb.GrantRequest(account_id="acct", amount=INITIAL, request_id=rid()),
            metadata=md,
            timeout=10,
        )

    rng = random.Random(20260101)
    plans = [
        [
            pb.ConsumeRequest(
                account_id="acct",
                feature="text",
                quantity=rng.randint(1, 4),
                request_id=f"c{i}-{j}-{uuid.uuid4().hex[:8]}",
            )
            for j in range(PER_CLIENT)
        ]
        for i in range(CLIENTS)
    ]
    total = CLIENTS * PER_CLIENT
    answers: dict[str, pb.ConsumeResponse | None] = {}
    router = Router(server.address)
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(run_client, plan, router, md, answers) for plan in plans]
        try:
            eventually(lambda: len(answers) >= total // 3, 60, interval_s=0.01)
            os.killpg(server.pgid, signal.SIGKILL)  # the server and its Redis, mid-run
            assert server.proc.wait(10) == -signal.SIGKILL
            eventually(lambda: processes_using(data) == [], 10)
            answered_before_restart = len(answers)
            assert answered_before_restart < total
            server = launch(data, env)  # the same data dir
            router.address = server.address
            logs = [f.result(timeout=90) for f in futures]
        finally:
            router.stop = True
    assert [u for log in logs for u in log.unexpected] == []
    assert sum(log.retries for log in logs) > 0, "no client saw the crash"
    assert len(answers) == total

    succeeded = {r: a for r, a in answers.items() if a is not None}
    refused = [r for r, a in answers.items() if a is None]
    assert succeeded and refused, (len(succeeded), len(refused))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        wait_flushed(stub, md)
        final = balance(stub, md, "acct")

    events = asyncio.run(read_ledger(ledger_url, data, tenant))
    assert_consumes_exactly_once(events, {r: a.transaction_id for r, a in succeeded.items()})
    consumed = sum(e.amount for e in events if e.kind == "consume")
    assert consumed == INITIAL - final == sum(a.amount for a in succeeded.values())
    audit_ok(data, tenant, env)
    assert server.terminate() == 0, server.stderr()


# --- 3. Redis wiped, rebuilt from the ledger -------------------------------------------
AccountView = tuple[pb.GetBalanceResponse, pb.GetUsageResponse, list[pb.Transaction]]


def views(stub: pb_grpc.CreditsStub, md: Metadata, accounts: list[str]) -> dict[str, AccountView]:
    """Balance, lots, usage and full history of each account."""
    result = {}
    for account in accounts:
        bal = stub.GetBalance(pb.GetBalanceRequest(account_id=account), metadata=md, timeout=10)
        usage = stub.GetUsage(pb.GetUsageRequest(account_id=account), metadata=md, timeout=10)
        history = stub.ListTransactions(
            pb.ListTransactionsRequest(account_id=account, page_size=1000), metadata=md, timeout=10
        )
        assert history.next_page_token == ""
        result[account] = (bal, usage, list(history.transactions))
    return result


def test_redis_wiped_then_rebuilt_from_the_ledger(
    launch: Launch, tmp_path: Path, ledger_url: str | None
) -> None:
    data = tmp_path / "data"
    tenant = fresh_tenant()
    key, _ = create_key(data, tenant, "admin")
    md = auth(key)
    env = server_env(ledger_url)
    server = launch(data, env)
    accounts = ["alice", "bob", "carl"]
    first_grant = pb.GrantRequest(
        account_id="alice",
        amount=100,
        valid_for=Duration(seconds=3600),
        priority=10,
        source=pb.LOT_SOURCE_PROMOTION,
        reference="spring",
        request_id=rid(),
    )
    first_consume = pb.ConsumeRequest(
        account_id="alice", feature="text", quantity=97, request_id=rid()
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        granted = stub.Grant(first_grant, metadata=md, timeout=10)
        stub.Grant(
            pb.GrantRequest(
                account_id="alice",
                amount=50,
                source=pb.LOT_SOURCE_PURCHASE,
                reference="order-1",
                request_id=rid(),
            ),
            metadata=md,
            timeout=10,
        )
        consumed = stub.Consume(first_consume, metadata=md, timeout=10)
        spanning = stub.Consume(
            pb.ConsumeRequest(account_id="alice", feature="voice", quantity=361, request_id=rid()),
            metadata=md,
            timeout=10,
        )
        assert [c.amount for c in spanning.charges] == [3, 4]  # 7 one-minute increments
        stub.Grant(
            pb.GrantRequest(account_id="bob", amount=30, request_id=rid()), metadata=md, timeout=10
        )
        stub.Consume(
            pb.ConsumeRequest(account_id="bob", feature="text", quantity=12, request_id=rid()),
            metadata=md,
            timeout=10,
        )
        stub.SetBalance(
            pb.SetBalanceRequest(account_id="bob", amount=5, reset=True, request_id=rid()),
            metadata=md,
            timeout=10,
        )
        stub.SetAccountOptions(
            pb.SetAccountOptionsRequest(account_id="carl", unlimited=True, request_id=rid()),
            metadata=md,
            timeout=10,
        )
        stub.Consume(
            pb.ConsumeRequest(account_id="carl", feature="video", quantity=90, request_id=rid()),
            metadata=md,
            timeout=10,
        )
        wait_flushed(stub, md)
        before = views(stub, md, accounts)

        # What the ledger says is what the server said.
        states = asyncio.run(ledger_accounts(ledger_url, data, tenant))
        assert set(states) == set(accounts)
        for account in ("alice", "bob"):
            bal, usage, _ = before[account]
            state = states[account]
            assert state.balance == bal.balance == usage.remaining
            assert state.live_lots() == {lot.lot_id: lot.remaining for lot in bal.lots}
            assert state.totals["granted"] == usage.total
            assert state.totals["used"] == usage.used
        assert before["alice"][0].balance == 150 - 97 - 7
        assert before["bob"][0].balance == 5 and before["bob"][1].removed == 18
        assert states["carl"].unlimited is True and before["carl"][1].used == 2

        url = (data / "redis" / "endpoint").read_text().strip()
        wiper = redis.Redis.from_url(url)
        try:
            wiper.flushall()
        finally:
            wiper.close()
        gone = rejected(
            lambda: stub.GetBalance(
                pb.GetBalanceRequest(account_id="alice"), metadata=md, timeout=10
            )
        )
        assert gone.reason == "ACCOUNT_NOT_FOUND"

        rebuilt = cli("rebuild", "--data-dir", str(data), env=env)
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
        assert "restored 3 accounts" in rebuilt.stdout, rebuilt.stdout
        assert views(stub, md, accounts) == before
        audit_ok(data, tenant, env)

        # Retries of flushed requests replay their first answers: no charge, no credit.
        again = stub.Consume(first_consume, metadata=md, timeout=10)
        assert again.transaction_id == consumed.transaction_id
        assert again.SerializeToString() == consumed.SerializeToString()
        regrant = stub.Grant(first_grant, metadata=md, timeout=10)
        assert regrant.lot.lot_id == granted.lot.lot_id
        assert regrant.SerializeToString() == granted.SerializeToString()
        wait_flushed(stub, md)
        assert views(stub, md, accounts) == before
    after = asyncio.run(ledger_accounts(ledger_url, data, tenant))
    assert {a: (s.balance, s.totals, s.seq) for a, s in after.items()} == {
        a: (s.balance, s.totals, s.seq) for a, s in states.items()
    }
    audit_ok(data, tenant, env)
    assert server.terminate() == 0, server.stderr()


# --- 4. ledger unavailable: backlog cap, health, recovery ------------------------------
class LedgerOutage:
    """Makes the in-process server's ledger refuse writes, and puts it back: PostgreSQL
    stopped, or SQLite's write lock held by another connection (root ignores chmod)."""

    def __init__(self, app: App, pg: PostgresServer | None) -> None:
        self.app = app
        self.pg = pg
        self.lock: sqlite3.Connection | None = None

    async def begin(self) -> None:
        if self.pg is not None:
            await asyncio.to_thread(self.pg.stop)
            return
        path = self.app.settings.data_dir / "ledger.db"
        lock = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        self.lock = lock
        await asyncio.to_thread(lock.execute, "BEGIN EXCLUSIVE")

    async def end(self) -> None:
        if self.pg is not None and not self.pg.running:
            await asyncio.to_thread(self.pg.start)
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            lock, self.lock = self.lock, None
            with suppress(sqlite3.Error):
                lock.execute("ROLLBACK")
            lock.close()


@pytest.fixture
def outage(app: App, request: pytest.FixtureRequest) -> Iterator[LedgerOutage]:
    """The outage ends at teardown whatever the test did: PostgreSQL is running again for
    the tests after this one, the SQLite lock released before the server stops."""
    pg: PostgresServer | None = None
    if app.settings.ledger_url is not None:
        pg = request.getfixturevalue("postgres_server")
    control = LedgerOutage(app, pg)
    try:
        yield control
    finally:
        control.release()
        if pg is not None and not pg.running:
            pg.start()


async def health_status(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


@pytest.mark.flusher(backlog_cap=200)
async def test_ledger_outage_fills_backlog_to_cap_then_drains_with_nothing_lost(
    app: App,
    tenant: Tenant,
    outage: LedgerOutage,
    ledger_url: str | None,
    private_redis_url: str,
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    async def status() -> pb.GetLedgerStatusResponse:
        reply = await tenant.admin.GetLedgerStatus(pb.GetLedgerStatusRequest())
        return cast(pb.GetLedgerStatusResponse, reply)

    await tenant.admin.Grant(pb.GrantRequest(account_id="acct", amount=100_000, request_id=rid()))

    async def drained() -> bool:
        s = await status()
        return s.backlog == 0 and s.accepting_changes

    await until(drained, 20, "backlog empty before the outage")

    acknowledged: dict[str, str] = {}
    await outage.begin()
    refusal: Failure | None = None
    refused_request = pb.ConsumeRequest()
    for _ in range(2000):
        request = pb.ConsumeRequest(account_id="acct", feature="text", request_id=rid())
        try:
            reply = await tenant.meter.Consume(request)
        except grpc.aio.AioRpcError as error:
            refusal, refused_request = failure(error), request
            break
        acknowledged[request.request_id] = reply.transaction_id
    assert refusal is not None, "the backlog never reached the cap"
    assert refusal.code == grpc.StatusCode.UNAVAILABLE, refusal
    assert (refusal.reason, refusal.domain) == ("LEDGER_BACKLOG", "creditmeter"), refusal
    assert refusal.metadata["cap"] == "200" and int(refusal.metadata["backlog"]) >= 200
    assert len(acknowledged) >= 99  # a consume and its request record: 2 entries each
    for service in ("", CREDITS_SERVICE):
        assert await health_status(tenant.channel, service) == not_serving
    during = await status()
    assert not during.accepting_changes and during.backlog >= 200 and during.backlog_cap == 200

    async def ledger_is(state: int) -> bool:
        return (await status()).ledger_state == state

    # The server's own ping finds the ledger gone (SQLite: after its 5 s busy timeout).
    await until(lambda: ledger_is(pb.LEDGER_STATE_UNREACHABLE), 20, "ledger seen unreachable")
    assert (await status()).HasField("unreachable_since")
    assert await health_status(tenant.channel, LEDGER_HEALTH_SERVICE) == not_serving
    # Every change is refused the same way, grants included; reads still work.
    grant_refused = await fails(
        tenant.admin.Grant(pb.GrantRequest(account_id="acct", amount=5, request_id=rid()))
    )
    assert grant_refused.reason == "LEDGER_BACKLOG"
    read = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="acct"))
    assert read.balance == 100_000 - len(acknowledged)

    began = time.monotonic()
    await outage.end()
    await until(drained, 60, "backlog drained after the ledger came back")
    drain_s = time.monotonic() - began
    for service in ("", CREDITS_SERVICE):
        assert await health_status(tenant.channel, service) == serving
    await until(lambda: ledger_is(pb.LEDGER_STATE_REACHABLE), 20, "ledger seen reachable")
    assert await health_status(tenant.channel, LEDGER_HEALTH_SERVICE) == serving

    # The refused call changed nothing: its retry is charged once, now.
    retried = await tenant.meter.Consume(refused_request)
    acknowledged[refused_request.request_id] = retried.transaction_id
    assert retried.balance == 100_000 - len(acknowledged)
    await asyncio.sleep(0.3)
    await until(drained, 20, "the retry flushed")

    assert app.ledger is not None
    events = await tenant_events(app.ledger, tenant.name)
    assert_consumes_exactly_once(events, acknowledged)
    assert sum(e.amount for e in events if e.kind == "consume") == len(acknowledged)
    extra = () if ledger_url is None else ("--ledger-url", ledger_url)
    audit_ok(app.settings.data_dir, tenant.name, ENV, "--redis-url", private_redis_url, *extra)
    assert drain_s < 30, f"the backlog took {drain_s:.1f} s to drain"


# --- 5. staged (ledger-first) grants and the reconciler --------------------------------
class InjectedFaults:
    """Makes the Redis step of chosen requests fail once: "before" the script runs (Redis
    unreachable), or "after" it ran (the reply lost on the way back)."""

    def __init__(self) -> None:
        self.planned: dict[str, str] = {}

    def wrap(self, real: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        async def flaky(keys: AccountKeys, call: Call, *args: Any) -> T:
            fault = self.planned.pop(call.request_id, None)
            lost = BackendUnavailable(f"injected: redis failed {fault}", {"backend": "redis"})
            if fault == "before":
                raise lost
            result = await real(keys, call, *args)
            if fault == "after":
                raise lost
            return result

        return flaky


@pytest.mark.flusher()
async def test_staged_grant_whose_redis_step_failed_is_applied_once(
    app: App,
    tenant: Tenant,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    ledger_url: str | None,
    private_redis_url: str,
) -> None:
    assert app.metering is not None and app.ledger is not None
    ledger = app.ledger
    store = app.metering.store
    faults = InjectedFaults()
    monkeypatch.setattr(store, "grant", faults.wrap(store.grant))
    monkeypatch.setattr(store, "set_balance", faults.wrap(store.set_balance))

    def grant(account: str, amount: int) -> pb.GrantRequest:
        return pb.GrantRequest(
            account_id=account,
            amount=amount,
            request_id=rid(),
            source=pb.LOT_SOURCE_PURCHASE,
            reference=f"order-{account}",
        )

    async def balance_of(account: str) -> int | None:
        try:
            reply = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id=account))
        except grpc.aio.AioRpcError as error:
            assert failure(error).reason == "ACCOUNT_NOT_FOUND", failure(error)
            return None
        return int(reply.balance)

    async def staged(request_id: str) -> str:
        """The lot id the ledger staged for a request (while it is unapplied)."""
        pending = await ledger.unapplied_grants(clock.now_ms() + 1, 10_000)
        [lot_id] = [g.lot_id for g in pending if g.request_id == request_id]
        return lot_id

    # Left to the reconciler, then retried by the client.
    late = grant("late", 100)
    faults.planned[late.request_id] = "before"
    failed = await fails(tenant.admin.Grant(late))
    assert (failed.code, failed.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
    late_lot = await staged(late.request_id)
    # SetBalance adds money the same way (ledger first).
    await tenant.admin.Grant(grant("topup", 10))
    topup = pb.SetBalanceRequest(account_id="topup", amount=15, request_id=rid())
    faults.planned[topup.request_id] = "before"
    await fails(tenant.admin.SetBalance(topup))
    topup_lot = await staged(topup.request_id)
    # Retried by the client at once.
    eager = grant("eager", 30)
    faults.planned[eager.request_id] = "before"
    await fails(tenant.admin.Grant(eager))
    eager_lot = await staged(eager.request_id)
    eager_reply = await tenant.admin.Grant(eager)
    assert (eager_reply.lot.lot_id, eager_reply.balance) == (eager_lot, 30)
    # Applied in Redis, but the client never heard.
    lost = grant("lost", 20)
    faults.planned[lost.request_id] = "after"
    await fails(tenant.admin.Grant(lost))
    lost_reply = await tenant.admin.Grant(lost)
    assert lost_reply.balance == 20
    assert faults.planned == {}

    # The reconciler leaves a staged grant alone until it is STAGED_GRANT_RETRY_AFTER_MS
    # old by the server's clock (the first call may still be on its way)...
    await asyncio.sleep(2.5)  # longer than RECONCILE_INTERVAL_S
    assert (await balance_of("late"), await balance_of("topup")) == (None, 10)
    # ... then applies it, with the lot id staged for it: once, however many servers'
    # reconcilers race for it (another server's, twice, beside this one's own loop).
    clock.advance(STAGED_GRANT_RETRY_AFTER_MS + 1)
    async with another_server(app, app.settings.data_dir, background_jobs=False) as second:
        await asyncio.gather(second._reconcile(), second._reconcile(), app._reconcile())

    async def applied() -> bool:
        return (await balance_of("late"), await balance_of("topup")) == (100, 25)

    await until(applied, 10, "the reconciler applied the staged grants")
    lots = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="late"))
    assert [lot.lot_id for lot in lots.lots] == [late_lot]
    retry = await tenant.admin.Grant(late)
    assert (retry.lot.lot_id, retry.balance) == (late_lot, 100)
    topup_retry = await tenant.admin.SetBalance(topup)
    assert (topup_retry.lot.lot_id, topup_retry.balance) == (topup_lot, 25)

    # Flushed: nothing is left unapplied, and later rounds of the reconciler change nothing.
    async def flushed() -> bool:
        s = await tenant.admin.GetLedgerStatus(pb.GetLedgerStatusRequest())
        pending = await ledger.unapplied_grants(clock.now_ms() + 1, 10_000)
        return s.backlog == 0 and not [g for g in pending if g.tenant == tenant.name]

    await asyncio.sleep(0.3)
    await until(flushed, 20, "grants flushed")
    clock.advance(STAGED_GRANT_RETRY_AFTER_MS + 1)
    await asyncio.sleep(2.5)
    balances = [await balance_of(a) for a in ("late", "topup", "eager", "lost")]
    assert balances == [100, 25, 30, 20]

    events = await tenant_events(ledger, tenant.name)
    grants = Counter((e.account, e.lot, e.amount) for e in events if e.kind == "grant")
    assert set(grants.values()) == {1}
    assert {g for g in grants if g[0] != "topup" or g[2] == 15} == {
        ("late", late_lot, 100),
        ("topup", topup_lot, 15),
        ("eager", eager_lot, 30),
        ("lost", lost_reply.lot.lot_id, 20),
    }
    extra = () if ledger_url is None else ("--ledger-url", ledger_url)
    audit_ok(app.settings.data_dir, tenant.name, ENV, "--redis-url", private_redis_url, *extra)


# --- the ledger down: calls that need it ------------------------------------------------
@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
@pytest.mark.flusher()
async def test_calls_that_need_the_ledger_fail_unavailable_while_it_is_down(
    app: App, tenant: Tenant, outage: LedgerOutage
) -> None:
    await tenant.admin.Grant(pb.GrantRequest(account_id="acct", amount=10, request_id=rid()))
    await outage.begin()
    read = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="acct"))
    assert read.balance == 10  # Redis reads do not need the ledger
    calls = {
        "Grant": tenant.admin.Grant(
            pb.GrantRequest(account_id="acct", amount=5, request_id=rid()), timeout=20
        ),
        "SetBalance": tenant.admin.SetBalance(
            pb.SetBalanceRequest(account_id="acct", amount=5, request_id=rid()), timeout=20
        ),
        "ListTransactions": tenant.read.ListTransactions(
            pb.ListTransactionsRequest(account_id="acct"), timeout=20
        ),
    }
    got = {name: await fails(call) for name, call in calls.items()}
    assert {n: (f.code, f.reason, f.domain) for n, f in got.items()} == dict.fromkeys(
        calls, (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", "creditmeter")
    ), got
    # The message names no address or driver error, only that the ledger is unavailable.
    assert {(f.message, f.metadata["backend"]) for f in got.values()} == {
        (UNAVAILABLE_MESSAGE, "ledger")
    }, got


# --- 6. started while the ledger is down -----------------------------------------------
@pytest.fixture
def cold_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of the test's own, initdb'd but not started: nothing listens on
    its port until the test starts it, and its `postgres` database has no schema yet (so
    whatever creates the tables is the server under test). Destroyed at teardown."""
    root = Path(tempfile.mkdtemp(prefix="creditmeter-pg-cold-", dir="/tmp"))
    root.chmod(0o755)  # the postgres user must reach it (see tests/pg.py)
    server: PostgresServer | None = None
    try:
        server = PostgresServer(find_bindir(), root)
        yield server
    finally:
        if server is not None:
            server.destroy()
        else:
            shutil.rmtree(root, ignore_errors=True)


#: A WARNING line of a ledger link's failed attempt: who, the attempt, the pause after it.
RETRY_LINE = re.compile(
    r"^\S+ \S+ WARNING creditmeter\.storage\.ledger\.connection: (server|flusher): "
    r"ledger unreachable[^(]*\(attempt (\d+)\): .+; retrying in ([\d.]+) s$",
    re.MULTILINE,
)
LEDGER_TABLES = {"events", "requests", "staged_grants", "purchases", "subscriptions"}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def retry_pauses(log: str, who: str) -> list[float]:
    """The pauses `who` ("server", "flusher") logged after its failed attempts, in order."""
    return [float(m[3]) for m in RETRY_LINE.finditer(log) if m[1] == who]


def assert_backs_off(log: str, who: str) -> None:
    """At least three failed attempts, each pause double the one before up to the cap."""
    pauses = retry_pauses(log, who)
    assert len(pauses) >= 3, log
    assert pauses[:3] == [
        LEDGER_RETRY_INITIAL_S * LEDGER_RETRY_MULTIPLIER**i for i in range(3)
    ], pauses
    assert max(pauses) <= LEDGER_RETRY_MAX_S, pauses


async def ledger_tables(url: str) -> set[str]:
    """The tables of the database's public schema (asyncpg directly: opening a ledger
    would create them)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    finally:
        await conn.close()
    return {r["table_name"] for r in rows}


def health_of(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(reply.status)


def ledger_state(stub: pb_grpc.CreditsStub, md: Metadata) -> pb.GetLedgerStatusResponse:
    reply = stub.GetLedgerStatus(pb.GetLedgerStatusRequest(), metadata=md, timeout=5)
    return cast(pb.GetLedgerStatusResponse, reply)


def assert_ledger_unavailable(f: Failure, port: int) -> None:
    """UNAVAILABLE / BACKEND_UNAVAILABLE for the ledger, with the message clients get: no
    address, driver, error class or traceback."""
    assert (f.code, f.reason, f.domain) == (
        grpc.StatusCode.UNAVAILABLE,
        "BACKEND_UNAVAILABLE",
        "creditmeter",
    ), f
    assert f.metadata == {"backend": "ledger"}, f
    assert f.message == UNAVAILABLE_MESSAGE, f
    assert str(port) not in f.message and "Error" not in f.message, f


def consume_free(stub: pb_grpc.CreditsStub, md: Metadata, account: str, n: int) -> dict[str, str]:
    """n Consume calls; the transaction each acknowledged, by request id."""
    acknowledged = {}
    for quantity in range(1, n + 1):
        request = pb.ConsumeRequest(
            account_id=account, feature="text", quantity=quantity, request_id=rid()
        )
        reply = stub.Consume(request, metadata=md, timeout=10)
        acknowledged[request.request_id] = reply.transaction_id
    return acknowledged


def test_serve_started_while_the_postgres_ledger_is_down_meters_then_drains(
    launch: Launch, tmp_path: Path, cold_postgres: PostgresServer
) -> None:
    """`creditmeter serve` started with nothing listening on the ledger's port, then
    restarted during a second outage: it serves, meters into the outbox, refuses only what
    needs the ledger, says the ledger is unreachable, and drains once it is back."""
    pg = cold_postgres
    url = pg.url("postgres")  # the database initdb made: no schema until the server's
    data = tmp_path / "data"
    tenant = fresh_tenant()
    key, _ = create_key(data, tenant, "admin")
    md = auth(key)
    env = server_env(url)
    assert not pg.running

    # Started while the ledger is down: it listens and Credits is healthy (launch waits
    # for SERVING); the ledger's own health entry and GetLedgerStatus say it is not reached.
    server = launch(data, env)
    assert health_of(server.address, "") == SERVING
    assert health_of(server.address, CREDITS_SERVICE) == SERVING
    assert health_of(server.address, LEDGER_HEALTH_SERVICE) == NOT_SERVING
    acknowledged: dict[str, str] = {}
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        status = ledger_state(stub, md)
        assert status.ledger_state == pb.LEDGER_STATE_UNREACHABLE, status
        assert status.HasField("unreachable_since") and status.accepting_changes, status

        # Metering goes into the outbox: options, consumptions, a call session.
        stub.SetAccountOptions(
            pb.SetAccountOptionsRequest(account_id="free", unlimited=True, request_id=rid()),
            metadata=md,
            timeout=10,
        )
        acknowledged |= consume_free(stub, md, "free", 10)
        stub.StartSession(
            pb.StartSessionRequest(
                account_id="free", feature="voice", session_id="call-1", requested_seconds=60
            ),
            metadata=md,
            timeout=10,
        )
        ended = stub.EndSession(
            pb.EndSessionRequest(
                account_id="free", session_id="call-1", sequence=1, used_seconds=90
            ),
            metadata=md,
            timeout=10,
        )
        assert ended.session.charged_amount == 2  # two one-minute increments
        # Reads from Redis work.
        usage = stub.GetUsage(pb.GetUsageRequest(account_id="free"), metadata=md, timeout=10)
        assert usage.unlimited and usage.used == sum(range(1, 11)) + 2
        stub.GetSession(
            pb.GetSessionRequest(account_id="free", session_id="call-1"), metadata=md, timeout=10
        )
        # What needs the ledger fails cleanly: history, reports, money in (ledger first).
        now = int(time.time())
        for call in (
            lambda: stub.ListTransactions(
                pb.ListTransactionsRequest(account_id="free"), metadata=md, timeout=10
            ),
            lambda: stub.GetUsageReport(
                pb.GetUsageReportRequest(
                    start_time=Timestamp(seconds=now - 86_400), end_time=Timestamp(seconds=now)
                ),
                metadata=md,
                timeout=10,
            ),
            lambda: stub.Grant(
                pb.GrantRequest(account_id="paid", amount=100, request_id=rid()),
                metadata=md,
                timeout=10,
            ),
        ):
            assert_ledger_unavailable(rejected(call), pg.port)
        eventually(lambda: ledger_state(stub, md).backlog > 0, 5)  # sampled every 0.2 s

        # It keeps trying, backing off, one WARNING line per attempt, in the server and
        # in its flusher child; neither exits.
        eventually(lambda: len(retry_pauses(server.stderr(), "server")) >= 3, 20)
        eventually(lambda: len(retry_pauses(server.stderr(), "flusher")) >= 3, 20)
        assert server.proc.poll() is None and len(children(server.pid)) == 2
        assert_backs_off(server.stderr(), "server")
        assert_backs_off(server.stderr(), "flusher")

        # The ledger comes up: the schema is created, the backlog drains.
        pg.start()
        eventually(
            lambda: ledger_state(stub, md).ledger_state == pb.LEDGER_STATE_REACHABLE,
            LEDGER_RETRY_MAX_S + 10,
        )
        wait_flushed(stub, md)
        assert not ledger_state(stub, md).HasField("unreachable_since")
        assert health_of(server.address, LEDGER_HEALTH_SERVICE) == SERVING
        assert asyncio.run(ledger_tables(url)) >= LEDGER_TABLES
        history = stub.ListTransactions(
            pb.ListTransactionsRequest(account_id="free", page_size=100), metadata=md, timeout=10
        )
        assert len(history.transactions) == 10 + 1 + 1  # consumptions, the session, options
        paid = stub.Grant(
            pb.GrantRequest(account_id="paid", amount=100, request_id=rid()),
            metadata=md,
            timeout=10,
        )
        assert paid.balance == 100
        wait_flushed(stub, md)
        # The running server notices the next outage too.
        pg.stop()
        eventually(
            lambda: ledger_state(stub, md).ledger_state == pb.LEDGER_STATE_UNREACHABLE, 10
        )
        assert health_of(server.address, LEDGER_HEALTH_SERVICE) == NOT_SERVING
    assert "ledger reachable after" in server.stderr()
    assert "Traceback" not in server.stderr(), server.stderr()
    assert server.terminate() == 0, server.stderr()

    # Restarted during that outage: the schema is there but cannot be checked; metering
    # goes on, on the credit granted before.
    restarted = launch(data, env)
    with grpc.insecure_channel(restarted.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        assert ledger_state(stub, md).ledger_state == pb.LEDGER_STATE_UNREACHABLE
        acknowledged |= consume_free(stub, md, "paid", 5)
        acknowledged |= consume_free(stub, md, "free", 3)
        assert balance(stub, md, "paid") == 100 - sum(range(1, 6))
        eventually(lambda: len(retry_pauses(restarted.stderr(), "server")) >= 2, 20)
        pg.start()
        eventually(
            lambda: ledger_state(stub, md).ledger_state == pb.LEDGER_STATE_REACHABLE,
            LEDGER_RETRY_MAX_S + 10,
        )
        wait_flushed(stub, md)

    # The ledger holds every acknowledged event once, and agrees with Redis.
    events = asyncio.run(read_ledger(url, data, tenant))
    assert_consumes_exactly_once(events, acknowledged)
    kinds = Counter(e.kind for e in events)
    assert (kinds["options"], kinds["grant"]) == (1, 1), kinds
    assert sum(e.amount for e in events if e.kind == "session") == 2
    audit_ok(data, tenant, env)
    assert "Traceback" not in restarted.stderr(), restarted.stderr()
    assert restarted.terminate() == 0, restarted.stderr()


async def test_flush_started_alone_while_the_ledger_is_down_waits_then_drains(
    cold_postgres: PostgresServer, private_redis_url: str, tmp_path: Path
) -> None:
    """`creditmeter flush` started alone with nothing listening on the ledger's port stays
    up, retrying with backoff, and drains the outboxes once PostgreSQL starts. The server
    beside it is the in-process App, started with the ledger down as well: its config
    store (PostgreSQL's too) cannot be written, so the tenant's keys are in the data
    directory's SQLite store beforehand, which the App serves from until PostgreSQL
    answers and then imports (as after an upgrade)."""
    pg = cold_postgres
    url = pg.url("postgres")
    data = tmp_path / "data"
    with SqliteConfigStore(data / CONFIG_DB_NAME) as before:
        name, keys = tenant_keys(before)
    app = App(
        Settings(
            listen="127.0.0.1:0",
            data_dir=data,
            redis_url=private_redis_url,
            ledger_url=url,
            flusher=False,  # `creditmeter flush` flushes
            shutdown_grace_s=1.0,
        )
    )
    await app.start()
    tenant = await tenant_of(app, name, keys)
    log_path = tmp_path / "flush.err"
    flush: subprocess.Popen[bytes] | None = None
    try:

        async def state() -> pb.GetLedgerStatusResponse:
            reply = await tenant.admin.GetLedgerStatus(pb.GetLedgerStatusRequest())
            return cast(pb.GetLedgerStatusResponse, reply)

        assert (await state()).ledger_state == pb.LEDGER_STATE_UNREACHABLE
        await tenant.admin.SetAccountOptions(
            pb.SetAccountOptionsRequest(account_id="free", unlimited=True, request_id=rid())
        )
        acknowledged = {}
        for quantity in range(1, 21):
            request = pb.ConsumeRequest(
                account_id="free", feature="text", quantity=quantity, request_id=rid()
            )
            acknowledged[request.request_id] = (await tenant.meter.Consume(request)).transaction_id
        refused = await fails(
            tenant.read.ListTransactions(pb.ListTransactionsRequest(account_id="free"))
        )
        assert_ledger_unavailable(refused, pg.port)

        with log_path.open("wb") as err:
            flush = await asyncio.to_thread(
                subprocess.Popen,
                [sys.executable, "-m", "creditmeter", "flush", "--data-dir", str(data),
                 "--redis-url", private_redis_url, "--ledger-url", url],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=ENV,
                start_new_session=True,
            )  # fmt: skip

        def log() -> str:
            return log_path.read_text(errors="replace")

        async def retried() -> bool:
            assert flush is not None and flush.poll() is None, f"flush exited:\n{log()}"
            return len(retry_pauses(log(), "flusher")) >= 3

        await until(retried, 20, "three retries of the flusher")
        assert_backs_off(log(), "flusher")
        assert (await state()).backlog > 0

        await asyncio.to_thread(pg.start)

        async def drained() -> bool:
            s = await state()
            return s.backlog == 0 and s.ledger_state == pb.LEDGER_STATE_REACHABLE

        await asyncio.sleep(0.3)  # the backlog is sampled every 0.2 s
        await until(drained, LEDGER_RETRY_MAX_S + 20, "drained into the ledger")
        assert await ledger_tables(url) >= LEDGER_TABLES
        events = await read_ledger(url, data, tenant.name)
        assert_consumes_exactly_once(events, acknowledged)
        assert sum(e.amount for e in events if e.kind == "consume") == sum(range(1, 21))
        history = await tenant.read.ListTransactions(
            pb.ListTransactionsRequest(account_id="free", page_size=100)
        )
        assert len(history.transactions) == 20 + 1

        flush.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(flush.wait, 30) == 0, log()
        assert "Traceback" not in log(), log()
        audit_ok(data, tenant.name, ENV, "--redis-url", private_redis_url, "--ledger-url", url)
    finally:
        if flush is not None and flush.poll() is None:
            flush.kill()
            await asyncio.to_thread(flush.wait, 10)
        await tenant.channel.close()
        await app.stop()
