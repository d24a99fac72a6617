"""Scale-out on a Redis Cluster (issue 11), with real `creditmeter serve` processes:

1. two servers on one cluster and one PostgreSQL ledger (which holds the configuration):
   the overdraft race split across both, a key revoked through the CLI refused by the other
   server within a second, and both flushers sharing the buckets, every event flushed once;
2. a primary killed under retried load, with and without `--replica-acks 1`: how soon
   service resumes on its shard, and what became of every acknowledged charge.

The figures are printed (`pytest -s` shows them)."""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.constants import DEFAULT_BUCKETS, FLUSHERS_KEY
from creditmeter.domain import keys as api_keys
from creditmeter.storage import layout
from creditmeter.storage.config_store import open_config_store
from creditmeter.storage.entries import ledger_records
from creditmeter.storage.layout import AccountKeys, flushed_key, outbox_key
from creditmeter.storage.leases import lease_key
from creditmeter.storage.ledger.base import Event
from tests.cluster import RedisClusterNodes, RedisNode
from tests.conftest import empty_redis, rid, sync_client, tenant_keys
from tests.helpers import failure
from tests.test_auth import key_id
from tests.test_ledger_faults import RETRYABLE, read_ledger, wait_flushed
from tests.test_server_process import ENV, Metadata, ServerProcess, auth, children, cli
from tests.test_shared_config import CONFIG_PROPAGATION_S, MARGIN_S

#: Buckets of every deployment here: the test process makes key names with the default
#: number, and the servers must agree (a new cluster deployment would take 1,024).
BUCKETS = DEFAULT_BUCKETS
#: A deadline per attempt: above a failover's length, so a slow attempt is retried, not
#: abandoned.
ATTEMPT_TIMEOUT_S = 5.0
RETRY_PAUSE_S = 0.05
#: Flushers share the buckets within a few lease rounds (FLUSH_MAINTENANCE_INTERVAL_S).
LEASES_TIMEOUT_S = 20.0


# --- servers and calls -----------------------------------------------------------------
@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Where `start_servers` records what it started: every one killed at teardown."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.cleanup()


def start_servers(
    started: list[ServerProcess], data_dirs: list[Path], env: dict[str, str], *args: str
) -> list[ServerProcess]:
    """A `creditmeter serve` on each data dir, each on a port of its own, all started at
    once, then waited for."""
    made = [ServerProcess(d, d.parent / "logs", env, args) for d in data_dirs]
    started.extend(made)
    for server in made:
        server.wait_ready()
    return made


def cluster_args(cluster: RedisClusterNodes, *extra: str) -> list[str]:
    return ["--redis-url", cluster.url, "--buckets", str(BUCKETS), *extra]


def flusher_name(server: ServerProcess) -> str:
    """The consumer (and lease owner) name of a server's flusher child: host-pid."""
    flushers = [
        pid for pid in children(server.pid)
        if b"\0flush\0" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]  # fmt: skip
    assert len(flushers) == 1, flushers
    return f"{socket.gethostname()}-{flushers[0]}"


def lease_holders(client: Any) -> Counter[str | None]:
    """How many buckets' flush leases each flusher holds (None: free)."""
    return Counter(client.get(lease_key(b, "flush")) for b in range(layout.buckets()))


def wait_for_leases(cluster: RedisClusterNodes, names: set[str]) -> float:
    """Until every bucket's flush lease is held by one of `names`, each holding some;
    the seconds it took."""
    client = sync_client(cluster.url)
    try:
        start = time.monotonic()
        while True:
            holders = lease_holders(client)
            if set(holders) == names and all(holders.values()):
                return time.monotonic() - start
            assert time.monotonic() - start < LEASES_TIMEOUT_S, holders
            time.sleep(0.1)
    finally:
        client.close()


def refused_after(stub: pb_grpc.CreditsStub, md: Metadata, since: float) -> float:
    """Poll with a revoked key until the server refuses it: the seconds from `since`.
    Fails once the README's second (and a margin) has passed."""
    while True:
        try:
            stub.ListRates(pb.ListRatesRequest(), metadata=md, timeout=5)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
            return time.monotonic() - since
        took = time.monotonic() - since
        assert took <= CONFIG_PROPAGATION_S + MARGIN_S, f"still taken {took:.3f} s after"
        time.sleep(0.02)


def one_account_per_bucket(tenant: str) -> list[str]:
    """Account ids of `tenant`, one in each bucket."""
    found: dict[int, str] = {}
    for i in range(100_000):
        found.setdefault(layout.bucket_of(tenant, f"spread-{i}"), f"spread-{i}")
        if len(found) == layout.buckets():
            return list(found.values())
    raise AssertionError("unreachable")


def assert_no_incidents(server: ServerProcess) -> None:
    """No call failed INTERNAL (each leaves one ERROR line) and nothing else went wrong."""
    assert " ERROR " not in server.stderr(), server.stderr()


@dataclass
class Charge:
    """One acknowledged Consume."""

    request_id: str
    account: str
    amount: int
    transaction_id: str
    #: When the attempt that succeeded was sent, and when its answer came (monotonic).
    sent: float
    answered: float


@dataclass
class Load:
    charges: list[Charge] = field(default_factory=list)
    refusals: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)


async def consume_until_answered(
    stub: pb_grpc.CreditsStub, md: Metadata, request: pb.ConsumeRequest, load: Load
) -> bool:
    """Send one request until it is answered, with its request id on every attempt: True
    once charged (recorded in `load`), False when refused (INSUFFICIENT_CREDITS, or an
    unexpected failure, recorded too)."""
    while True:
        sent = time.monotonic()
        try:
            reply = await stub.Consume(request, metadata=md, timeout=ATTEMPT_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            info = failure(error)
            if info.reason == "INSUFFICIENT_CREDITS":
                load.refusals += 1
                return False
            if info.code not in RETRYABLE:
                load.unexpected.append(f"{info.code.name} {info.reason}: {info.message}")
                return False
            load.retries[f"{info.code.name} {info.reason}"] += 1
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        load.charges.append(
            Charge(request.request_id, request.account_id, int(reply.amount),
                   reply.transaction_id, sent, time.monotonic())
        )  # fmt: skip
        return True


def consume_transactions(events: list[Event]) -> dict[str, set[str]]:
    """The ledger's consume transactions, per request id."""
    txns: dict[str, set[str]] = defaultdict(set)
    for e in events:
        if e.kind == "consume":
            txns[e.request_id].add(e.txn)
    return txns


# --- 1. two servers, one cluster, one PostgreSQL ---------------------------------------
CLIENTS_PER_SERVER = 32
CREDITS = 10_000


def test_two_servers_share_one_cluster_and_one_postgres(
    redis_cluster: RedisClusterNodes,
    fresh_postgres_url: str,
    servers: list[ServerProcess],
    tmp_path: Path,
) -> None:
    """Two `serve` processes, each with its own data dir, on the session's cluster and a
    PostgreSQL database of the test's own (ledger and configuration); the keys are made
    once, in that database."""
    cluster, pg = redis_cluster, fresh_postgres_url
    # Outboxes, leases and flushers' figures of this test alone (the cluster is shared).
    empty_redis(cluster.url)
    with open_config_store(pg, tmp_path / "cli") as store:
        tenant, keys = tenant_keys(store)
    env = {**ENV, "CREDITMETER_LEDGER_URL": pg}
    a, b = start_servers(servers, [tmp_path / "a", tmp_path / "b"], env, *cluster_args(cluster))
    admin, meter = auth(keys[api_keys.Role.ADMIN]), auth(keys[api_keys.Role.METER])
    account = "shared"
    names = {flusher_name(s) for s in (a, b)}
    took = wait_for_leases(cluster, names)
    print(f"\nboth flushers hold leases {took:.1f} s after the second server was ready")

    # (a) The overdraft race: 64 clients, half on each server, charge 1 credit at a time
    # with fresh request ids until refused.
    stop_polling = threading.Event()
    raw: list[int] = []

    def poll_redis() -> None:
        """The account hash's own balance (GetBalance's is clamped at 0), as often as
        Redis answers, from a thread of its own."""
        client = sync_client(cluster.url)
        try:
            while not stop_polling.is_set():
                raw.append(int(client.hget(AccountKeys(tenant, account).account_key,
                                           "balance") or 0))  # fmt: skip
        finally:
            client.close()

    async def race() -> tuple[Load, list[int]]:
        channels = [
            grpc.aio.insecure_channel(s.address) for s in (a, b) for _ in range(CLIENTS_PER_SERVER)
        ]  # each client its own connection
        stubs = [pb_grpc.CreditsStub(c) for c in channels]
        await stubs[0].Grant(
            pb.GrantRequest(account_id=account, amount=CREDITS, request_id=rid()),
            metadata=admin, timeout=10,
        )  # fmt: skip
        load, spendable = Load(), []
        done = asyncio.Event()

        async def client(stub: pb_grpc.CreditsStub) -> None:
            while await consume_until_answered(
                stub, meter,
                pb.ConsumeRequest(account_id=account, feature="text", quantity=1,
                                  request_id=rid()),
                load,
            ):  # fmt: skip
                pass

        async def poll_balance() -> None:
            for i in range(10**9):
                if done.is_set():
                    return
                reply = await stubs[i % 2 * CLIENTS_PER_SERVER].GetBalance(
                    pb.GetBalanceRequest(account_id=account), metadata=meter, timeout=5
                )
                spendable.append(int(reply.balance))

        poller = asyncio.create_task(poll_balance())
        began = time.monotonic()
        await asyncio.gather(*(client(stub) for stub in stubs))
        took = time.monotonic() - began
        done.set()
        await poller
        print(f"{len(load.charges)} charges in {took:.1f} s "
              f"({len(load.charges) / took:.0f}/s over 2 servers), {load.refusals} refusals, "
              f"retries {dict(load.retries)}")  # fmt: skip
        for channel in channels:
            await channel.close()
        return load, spendable

    poller = threading.Thread(target=poll_redis)
    poller.start()
    try:
        load, spendable = asyncio.run(race())
    finally:
        stop_polling.set()
        poller.join()
    print(f"balance polled {len(raw)} times in Redis, {len(spendable)} through GetBalance; "
          f"lowest {min(raw)}")  # fmt: skip
    assert load.unexpected == []
    assert len(load.charges) == len({c.request_id for c in load.charges}) == CREDITS
    assert load.refusals == 2 * CLIENTS_PER_SERVER  # each client stopped at its first
    assert min(raw) >= 0 and min(spendable) >= 0
    assert {s.address for s in (a, b)}  # both served: half the clients were on each

    with grpc.insecure_channel(a.address) as on_a, grpc.insecure_channel(b.address) as on_b:
        stub_a, stub_b = pb_grpc.CreditsStub(on_a), pb_grpc.CreditsStub(on_b)
        for stub in (stub_a, stub_b):
            balance = stub.GetBalance(pb.GetBalanceRequest(account_id=account), metadata=meter)
            usage = stub.GetUsage(pb.GetUsageRequest(account_id=account), metadata=meter)
            assert (balance.balance, usage.used, usage.remaining) == (0, CREDITS, 0)

        # (b) A key revoked with the CLI (with server A's data dir and ledger URL) is
        # refused by both servers within a second of the CLI's exit.
        reader = auth(keys[api_keys.Role.READ])
        for stub in (stub_a, stub_b):
            stub.ListRates(pb.ListRatesRequest(), metadata=reader, timeout=5)
        started = time.monotonic()
        revoke = cli("keys", "revoke", key_id(keys[api_keys.Role.READ]),
                     "--data-dir", str(a.data_dir), env=env)  # fmt: skip
        assert revoke.returncode == 0, revoke.stderr
        revoked = time.monotonic()
        took = {name: refused_after(stub, reader, revoked)
                for name, stub in (("B", stub_b), ("A", stub_a))}  # fmt: skip
        print(f"key revoked through the CLI (which ran {revoked - started:.3f} s): refused by "
              f"server B {took['B']:.3f} s and by A {took['A']:.3f} s after it exited")

        # (c) Entries in every bucket, so that both flushers have some to write: a grant
        # to an account in each, through either server.
        for n, account_id in enumerate(one_account_per_bucket(tenant)):
            (stub_a, stub_b)[n % 2].Grant(
                pb.GrantRequest(account_id=account_id, amount=1, request_id=rid()),
                metadata=admin, timeout=10,
            )  # fmt: skip
        wait_flushed(stub_b, admin)

    # The ledger agrees: one consume transaction per acknowledged charge, nothing else.
    events = asyncio.run(read_ledger(pg, tmp_path / "cli", tenant))
    assert consume_transactions(events) == {c.request_id: {c.transaction_id}
                                            for c in load.charges}  # fmt: skip
    assert sum(e.amount for e in events if e.kind == "consume") == CREDITS
    audited = cli("audit", "--data-dir", str(a.data_dir), "--redis-url", cluster.url,
                  "--tenant", tenant, env=env)  # fmt: skip
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert "0 with drift" in audited.stdout, audited.stdout

    # (c) Both flushers hold leases, and every outbox entry reached the ledger once.
    client = sync_client(cluster.url)
    try:
        holders = lease_holders(client)
        outbox_events: list[str] = []
        added = acked = 0
        for bucket in range(layout.buckets()):
            added += int(client.xinfo_stream(outbox_key(bucket))["entries-added"])
            acked += int(client.get(flushed_key(bucket)) or 0)
            for _entry_id, fields in client.xrange(outbox_key(bucket)):
                outbox_events.extend(e.event_id for e in ledger_records(fields)[0])
        written = {k: int(v.split()[0]) for k, v in client.hgetall(FLUSHERS_KEY).items()}
    finally:
        client.close()
    print(f"flush leases held: {dict(holders)}; outbox entries {added}, acknowledged {acked}, "
          f"their events {len(outbox_events)}, in the ledger {len(events)}; written by "
          f"each flusher {written}")  # fmt: skip
    assert set(holders) == names and all(n > 0 for n in holders.values()), holders
    assert added == acked == CREDITS + 1 + layout.buckets()  # each grant and charge
    assert sorted(e.event_id for e in events) == sorted(outbox_events)
    assert set(written) == names and all(written.values()), written
    # Each flusher counts every event it writes, a duplicate too: none was written twice.
    assert sum(written.values()) == len(events)

    for server in (a, b):
        assert server.terminate() == 0, server.stderr()
        assert_no_incidents(server)


# --- 2. a primary killed under retried load -------------------------------------------
CLIENTS = 8
SHARD_ACCOUNTS = 4
GRANT = 10**9
#: Warm-up: charges on the shard before anything happens.
WARM_UP_CHARGES = 200
#: The README's failover promise, checked: the cluster's own failover (2-3 s with a 1 s
#: node timeout, tests/test_cluster_fixture.py) and the server following it.
RESUME_BOUND_S = 15.0
#: How soon after the cluster the server is back: its slot map refreshed, a retry's pause.
FOLLOW_S = 3.0
#: How long the load goes on with the replica frozen and behind, before the kill.
LAG_WINDOW_S = 1.0
#: Written to the primary once its replica is frozen: more than the loopback socket
#: buffers between the two hold (about 4.5 MB measured), so that every write after it
#: waits in the primary's own memory (its replica output buffer), and dies with it.
PADDING_BYTES = 4 * 1024 * 1024
PADDING_WRITES = 3
#: Load after service resumed, before the clients stop.
AFTER_RESUME_S = 2.0


def accounts_on(
    cluster: RedisClusterNodes, tenant: str, primary: RedisNode, count: int, elsewhere: bool
) -> list[str]:
    """`count` account ids whose keys are on `primary` (or, `elsewhere`, on another
    primary), each in a bucket of its own."""
    found: dict[int, str] = {}
    for i in range(100_000):
        keys = AccountKeys(tenant, f"acct-{i}")
        on_it = cluster.primary_for_key(keys.account_key) is primary
        if on_it != elsewhere and keys.bucket not in found:
            found[keys.bucket] = keys.account
            if len(found) == count:
                return list(found.values())
    raise AssertionError("not enough accounts found")


def key_on(cluster: RedisClusterNodes, primary: RedisNode, prefix: str) -> str:
    """A key (outside creditmeter's names) in a slot of `primary`."""
    for i in range(100_000):
        if cluster.primary_for_key(f"{prefix}-{i}") is primary:
            return f"{prefix}-{i}"
    raise AssertionError("no key found")


@dataclass
class Outcome:
    """What became of one account's acknowledged charges."""

    acknowledged: int
    redis_used: int
    ledger_used: int
    #: Acknowledged request ids whose charge Redis no longer has (its idempotency record
    #: is gone), and those whose consume transaction the ledger lacks.
    lost_in_redis: set[str]
    lost_in_ledger: set[str]
    #: Request ids with more than one consume transaction in the ledger.
    twice_in_ledger: set[str]


@pytest.mark.parametrize("replica_acks", [1, 0], ids=["replica-acks-1", "no-replica-acks"])
def test_primary_killed_under_retried_load(
    failover_cluster: RedisClusterNodes,
    servers: list[ServerProcess],
    tmp_path: Path,
    replica_acks: int,
) -> None:
    """Eight clients charge four accounts whose keys are on one primary (a ninth an
    account on another), retrying UNAVAILABLE, DEADLINE_EXCEEDED and CANCELLED with the
    same request id until a definitive answer; one server, SQLite ledger. The primary is
    killed and its replica takes over.

    Replication is asynchronous, and on loopback a replica is microseconds behind: a plain
    kill loses nothing either way. So the window is opened: the replica is frozen
    (SIGSTOP, as a replica stalled on its disk or network), the socket buffers between the
    two filled with a padding write, and the load goes on for LAG_WINDOW_S; every change
    made meanwhile is in the primary's memory alone. The primary is killed, the replica
    thawed at once: it gets what the sockets held, then is promoted.

    - `--replica-acks 1`: nothing made in the window is acknowledged (WAIT counts no
      replica: the calls fail UNAVAILABLE and are retried, and the flusher holds those
      entries back from the ledger). So no acknowledged charge may be lost and clients,
      Redis and the ledger must agree exactly. The promoted replica has no replica of its
      own, so the shard takes no change until the killed node is back (restarted at once,
      it rejoins as the new primary's replica): service resumes after that.
    - without: what was acknowledged in the window is lost from Redis (measured and
      printed), but the flusher had read most of it from the primary before the kill:
      the ledger keeps charges that Redis lost, and `creditmeter audit` reports the
      drift. What must hold still: no overdraft, no request id charged twice, nothing in
      Redis missing from the ledger.
    """
    cluster = failover_cluster
    primary = cluster.primaries()[0]
    (replica,) = cluster.replicas_of(primary)
    data = tmp_path / "server"
    with open_config_store(None, data) as store:
        tenant, keys = tenant_keys(store)
    md = auth(keys[api_keys.Role.ADMIN])
    shard = accounts_on(cluster, tenant, primary, SHARD_ACCOUNTS, elsewhere=False)
    [control] = accounts_on(cluster, tenant, primary, 1, elsewhere=True)
    acks = ["--replica-acks", str(replica_acks)] if replica_acks else []
    [server] = start_servers(servers, [data], ENV, *cluster_args(cluster, *acks))

    async def run() -> tuple[Load, dict[str, float]]:
        load, marks = Load(), {}
        stop = asyncio.Event()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.CreditsStub(channel)
            for account in [*shard, control]:
                await stub.Grant(
                    pb.GrantRequest(account_id=account, amount=GRANT, request_id=rid()),
                    metadata=md, timeout=10,
                )  # fmt: skip

        async def client(account: str, n: int) -> None:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.CreditsStub(channel)
                for j in range(10**9):
                    if stop.is_set():
                        return
                    request = pb.ConsumeRequest(
                        account_id=account, feature="text", quantity=1 + j % 3,
                        request_id=f"c{n}-{j}-{uuid.uuid4().hex[:8]}",
                    )  # fmt: skip
                    await consume_until_answered(stub, md, request, load)

        def on_shard_since(t: float) -> list[Charge]:
            return [c for c in load.charges if c.account in shard and c.sent >= t]

        async def until(check: Callable[[], object], timeout_s: float, what: str) -> None:
            deadline = time.monotonic() + timeout_s
            while not check():
                assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(client(shard[n % SHARD_ACCOUNTS], n)) for n in range(CLIENTS)]
        tasks.append(asyncio.create_task(client(control, CLIENTS)))
        began = time.monotonic()
        await until(lambda: len(on_shard_since(began)) >= WARM_UP_CHARGES, 30, "warm-up")

        # The replica frozen and the pipe to it full: from here on it falls behind.
        await asyncio.to_thread(cluster.freeze, replica)
        padding = key_on(cluster, primary, "padding")
        for _ in range(PADDING_WRITES):
            await asyncio.to_thread(primary.client().set, padding, "p" * PADDING_BYTES)
        memory = await asyncio.to_thread(primary.info, "memory")
        window = time.monotonic()
        await asyncio.sleep(LAG_WINDOW_S)

        await asyncio.to_thread(cluster.kill, primary)
        killed = time.monotonic()
        await asyncio.to_thread(cluster.thaw, replica, settle=False)
        buffered = memory["mem_clients_slaves"] / 2**20
        print(f"\nreplica frozen, {buffered:.1f} MiB waiting in the primary's replica output "
              f"buffer; {len(on_shard_since(window))} charges acknowledged on the shard in "
              f"the {LAG_WINDOW_S} s window, then the kill")  # fmt: skip
        marks["failover"] = await asyncio.to_thread(cluster.wait_failover, primary)
        if replica_acks:
            # From this thread, which outlives the node (see restart).
            cluster.restart(primary, wait=False)
            await asyncio.to_thread(cluster.wait_settled)
            marks["rejoined"] = time.monotonic() - killed
        await until(lambda: on_shard_since(killed), RESUME_BOUND_S * 2, "service to resume")
        marks["resumed"] = min(c.answered for c in on_shard_since(killed)) - killed
        await asyncio.sleep(AFTER_RESUME_S)
        stop.set()
        await asyncio.gather(*tasks)
        return load, marks

    load, marks = asyncio.run(run())
    elsewhere = [c.answered for c in load.charges if c.account == control]
    rejoined = f"; back as a replica {marks['rejoined']:.2f} s after" if replica_acks else ""
    print(f"failover (the cluster's) {marks['failover']:.2f} s after the kill{rejoined}; "
          f"service on the shard resumed {marks['resumed']:.2f} s after it; the other shard's "
          f"longest pause {max(b - a for a, b in itertools.pairwise(elsewhere)):.2f} s; "
          f"{len(load.charges)} charges, retries {dict(load.retries)}")  # fmt: skip
    assert load.unexpected == [], load.unexpected[:5]
    assert marks["resumed"] <= RESUME_BOUND_S
    # The server follows the cluster: service is back soon after the shard can take changes
    # again (the promoted replica; with acks, its own replica back too).
    assert marks["resumed"] <= max(marks["failover"], marks.get("rejoined", 0)) + FOLLOW_S

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        wait_flushed(stub, md)
        usage = {
            a: stub.GetUsage(pb.GetUsageRequest(account_id=a), metadata=md, timeout=10)
            for a in [*shard, control]
        }
    events = asyncio.run(read_ledger(None, data, tenant))
    txns = consume_transactions(events)
    client = sync_client(cluster.url)
    outcomes: dict[str, Outcome] = {}
    try:
        for account in [*shard, control]:
            mine = [c for c in load.charges if c.account == account]
            keys_of = AccountKeys(tenant, account)
            outcomes[account] = Outcome(
                acknowledged=sum(c.amount for c in mine),
                redis_used=int(usage[account].used),
                ledger_used=sum(e.amount for e in events
                                if e.kind == "consume" and e.account == account),
                lost_in_redis={c.request_id for c in mine
                               if not client.exists(keys_of.idempotency_key(c.request_id))},
                lost_in_ledger={c.request_id for c in mine
                                if c.transaction_id not in txns.get(c.request_id, set())},
                twice_in_ledger={c.request_id for c in mine
                                 if len(txns.get(c.request_id, ())) > 1},
            )  # fmt: skip
    finally:
        client.close()
    for account, o in outcomes.items():
        print(f"{account} ({'other shard' if account == control else 'shard'}): acknowledged "
              f"{o.acknowledged} credits, Redis {o.redis_used}, ledger {o.ledger_used}; "
              f"acknowledged charges lost: {len(o.lost_in_redis)} from Redis, "
              f"{len(o.lost_in_ledger)} from the ledger, "
              f"{len(o.lost_in_redis & o.lost_in_ledger)} from both; request ids charged "
              f"twice in the ledger: {len(o.twice_in_ledger)}")  # fmt: skip
    audited = cli("audit", "--data-dir", str(data), "--redis-url", cluster.url,
                  "--tenant", tenant)  # fmt: skip
    print(audited.stdout.strip().splitlines()[-1])

    for account in [*shard, control]:
        assert usage[account].remaining == GRANT - usage[account].used >= 0  # no overdraft
    for o in outcomes.values():
        assert o.twice_in_ledger == set()
        assert o.lost_in_ledger <= o.lost_in_redis  # what Redis has, the ledger has
        assert o.redis_used <= o.ledger_used
    # The other shard lost nothing either way.
    assert outcomes[control].lost_in_redis == set()
    assert outcomes[control].acknowledged == outcomes[control].redis_used
    drift = any(o.redis_used != o.ledger_used for o in outcomes.values())
    assert audited.returncode == (1 if drift else 0), audited.stdout + audited.stderr
    if replica_acks:
        for o in outcomes.values():
            assert (o.lost_in_redis, o.lost_in_ledger) == (set(), set())
            assert o.acknowledged == o.redis_used == o.ledger_used
    assert server.terminate() == 0, server.stderr()
    assert_no_incidents(server)
